"""nginx benchmark: Gunicorn behind the rendered gunicorn-ext nginx config.

    .venv/bin/python bench/nginx.py        (also run by `make bench`)

One run starts two real Gunicorn instances (2 sync workers each) of bench/nginx_app.py
(a tiny WSGI app wrapped in ``RouteCookie``, answering with its route name) and one real
nginx in the foreground, configured with ``gunicorn_ext.nginx.render(...)`` for both
backends (state, pid and logs in a temporary directory, 127.0.0.1 only). It measures,
each figure beside its baseline:

1. req/s straight to one Gunicorn instance (the baseline);
2. req/s through nginx without a cookie (load-balanced over both instances);
3. req/s through nginx with a pinned ``gx_route`` cookie (all to one instance);
4. the share of 200 cookie-carrying requests answered by their pinned backend.

The three loads run alternating, ``wrk -c4``, median of BENCH_NGINX_ROUNDS (3) rounds of
BENCH_NGINX_SECONDS (3) s. Writes bench/results/nginx.json and bench/results/nginx.svg.
Needs nginx and wrk; a crash fails the run, nginx and Gunicorn are always stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

import _wrk  # noqa: E402
from harness import Gunicorn, free_port, running_gunicorn, running_nginx, wait_for  # noqa: E402
from plot import Bar, Panel, write_svg  # noqa: E402

from gunicorn_ext.nginx import find_nginx, render, wrapper_conf  # noqa: E402
from gunicorn_ext.sticky import route_name  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_NGINX_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_NGINX_SECONDS", "3"))
CONNECTIONS = 4
WORKERS = 2
SHARE_N = 200
COOKIE = "gx_route"


def log(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def backend(log_dir: Path, name: str) -> Iterator[tuple[Gunicorn, str]]:
    port = free_port()
    route = route_name(f"127.0.0.1:{port}")
    with running_gunicorn("nginx_app:app", cwd=str(BENCH), port=port, workers=WORKERS,
                          env={"GX_ROUTE": route}, log_dir=str(log_dir), health_path="/",
                          name=name, ready_timeout=30.0) as g:
        g.wait_workers(WORKERS)
        yield g, route


@contextlib.contextmanager
def nginx_for(tmp: Path, backends: list[str]) -> Iterator[str]:
    """nginx in the foreground with render(backends); yields its base URL; always killed."""
    if find_nginx() is None:
        raise RuntimeError("nginx not found; run `make system-deps`")
    port = free_port()
    conf = tmp / "gunicorn-ext.conf"
    # Listen on 127.0.0.1 only (render() writes `listen <port>`, i.e. all addresses).
    conf.write_text(re.sub(rf"listen {port}\b", f"listen 127.0.0.1:{port}",
                           render(backends, port, "127.0.0.1")))
    wrapper = tmp / "nginx.conf"
    wrapper.write_text(wrapper_conf([str(conf)], str(tmp),
                                    user="root" if os.geteuid() == 0 else None))
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(url + "/", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    with running_nginx(wrapper, port):
        wait_for(answers, 15, what="nginx answering 200")
        yield url


def answers(url: str, n: int, cookie: str | None) -> Counter[str]:
    """Which route answered each of *n* requests (fresh connection each, like a browser tab)."""
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    seen: Counter[str] = Counter()
    with requests.Session() as s:
        for _ in range(n):
            r = s.get(url + "/", headers=headers, timeout=5)
            s.cookies.clear()  # only the explicit header counts
            seen[r.text.strip() if r.status_code == 200 else f"HTTP {r.status_code}"] += 1
    return seen


def main() -> int:
    wrk = shutil.which("wrk") or ("/usr/bin/wrk" if os.access("/usr/bin/wrk", os.X_OK) else None)
    if wrk is None:
        log("nginx bench needs wrk (make bench-deps)")
        return 1
    t_start = time.monotonic()
    errors: list[str] = []
    rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "nginx": [], "nginx_pinned": []}
    with tempfile.TemporaryDirectory(prefix="gx-bench-nginx-") as tmpd:
        tmp = Path(tmpd)
        (tmp / "nginx").mkdir()
        with backend(tmp, "nginx-a") as (ga, route_a), backend(tmp, "nginx-b") as (gb, route_b), \
                nginx_for(tmp / "nginx", [ga.bind, gb.bind]) as nurl:
            loads = {
                "direct": (ga.url("/"), (f"Cookie: {COOKIE}={route_a}",)),
                "nginx": (nurl + "/", ()),
                "nginx_pinned": (nurl + "/", (f"Cookie: {COOKIE}={route_a}",)),
            }
            # The direct baseline carries the same cookie, so RouteCookie adds no
            # Set-Cookie there either: it differs from nginx_pinned only by nginx.
            for url, hdrs in loads.values():  # warm up
                _wrk.run(wrk, url, 1, CONNECTIONS, hdrs)
            log(f"req/s, {ROUNDS} rounds of {SECONDS}s, wrk -c{CONNECTIONS}, alternating; "
                f"backends {route_a} and {route_b} ({WORKERS} sync workers each)")
            for r in range(ROUNDS):
                order = list(loads) if r % 2 == 0 else list(reversed(loads))
                for key in order:
                    url, hdrs = loads[key]
                    res = _wrk.run(wrk, url, SECONDS, CONNECTIONS, hdrs)
                    if res["non_2xx"]:
                        errors.append(f"{key} round {r + 1}: {res['non_2xx']} non-2xx responses")
                    rounds[key].append(res)
                log(f"  round {r + 1}: direct {rounds['direct'][-1]['rps']:,.0f}, "
                    f"nginx {rounds['nginx'][-1]['rps']:,.0f}, "
                    f"nginx pinned {rounds['nginx_pinned'][-1]['rps']:,.0f} req/s")
            pinned = {route_a: answers(nurl, SHARE_N // 2, route_a),
                      route_b: answers(nurl, SHARE_N - SHARE_N // 2, route_b)}
            unpinned = answers(nurl, SHARE_N, None)
            forged = answers(nurl, 20, "127_0_0_1_22")
            for g in (ga, gb):
                if "Traceback" in g.log_text():
                    errors.append(f"traceback in {g.log_path.name}:\n{g.log_text_tail()}")
    hits = sum(c[route] for route, c in pinned.items())
    total = sum(sum(c.values()) for c in pinned.values())
    med = {k: statistics.median(x["rps"] for x in v) for k, v in rounds.items()}
    d, n, p = med["direct"], med["nginx"], med["nginx_pinned"]
    share = hits / total
    result: dict[str, Any] = {
        "direct_rps": d, "nginx_rps": n, "nginx_pinned_rps": p, "pinned_share": share,
        "nginx_vs_direct": n / d, "nginx_pinned_vs_direct": p / d, "nginx_pinned_vs_nginx": p / n,
        "pinned_hits": hits, "pinned_requests": total,
        "pinned_answers": {k: dict(v) for k, v in pinned.items()},
        "unpinned_answers": dict(unpinned), "forged_cookie_answers": dict(forged),
        "rounds": rounds, "errors": errors,
        "params": {"rounds": ROUNDS, "seconds": SECONDS, "connections": CONNECTIONS,
                   "workers_per_instance": WORKERS, "instances": 2},
        "machine": {"cpus_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "nginx": subprocess.run([find_nginx() or "nginx", "-v"], capture_output=True,
                                            text=True).stderr.strip(),
                    "loadavg_at_end": list(os.getloadavg())},
        "duration_s": time.monotonic() - t_start,
    }
    log("")
    log(f"{'':34}{'figure':>14}   baseline")
    log(f"{'direct to one Gunicorn (2 workers)':34}{d:>10,.0f} r/s   (baseline)")
    log(f"{'through nginx, no cookie':34}{n:>10,.0f} r/s   direct {d:,.0f} r/s ({n / d:.2f}x; "
        "spread over 2 instances)")
    log(f"{'through nginx, pinned cookie':34}{p:>10,.0f} r/s   direct {d:,.0f} r/s ({p / d:.2f}x); "
        f"nginx unpinned {n:,.0f} ({p / n:.2f}x)")
    log(f"{'pinned requests on their backend':34}{share:>13.1%}   expected 100% "
        f"({hits}/{total})")
    log(f"{'no cookie, answers per backend':34}{'':>14}   {dict(unpinned)}")
    log(f"{'forged cookie (127_0_0_1_22)':34}{'':>14}   {dict(forged)} (pool)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nginx.json").write_text(json.dumps(result, indent=2) + "\n")
    write_svg(RESULTS / "nginx.svg", "Gunicorn behind nginx (rendered gunicorn-ext config)", [
        Panel("hello world, wrk -c4", "req/s", [
            ("no cookie", [Bar("direct (1 instance)", d), Bar("nginx (2 instances)", n, ours=True)]),
            ("pinned", [Bar("direct (1 instance)", d), Bar("nginx + gx_route", p, ours=True)]),
        ]),
        Panel("sticky routing", "% on pinned backend", [
            ("200 requests", [Bar("pinned", share * 100, ours=True), Bar("expected", 100.0)]),
        ]),
    ])
    log(f"wrote {RESULTS / 'nginx.json'} and {RESULTS / 'nginx.svg'} ({result['duration_s']:.0f} s)")
    for e in errors:
        log(f"WARNING: {e}")
    return 0 if share == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
