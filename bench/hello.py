"""Hello-world req/s with every gunicorn-ext feature on, beside plain Gunicorn, per worker class.

    make bytecode && .venv/bin/python bench/hello.py          (also run by `make bench`)

`make bytecode` gives gunicorn_ext the bytecode a wheel install has, as plain Gunicorn's
modules have theirs (the Makefile says what compiling from source at each start costs).

For each worker class (BENCH_HELLO_CLASSES, default sync, gthread, gevent, asgi and
uvicorn_worker.UvicornWorker when installed) two Gunicorns run side by side with the same
settings (bench/hello_plain_conf.py; bench/hello_ext_conf.py adds ``gunicorn_ext.enable``
with everything on: metrics, reporter, bus, request deadlines, the route cookie, the soft
memory limit, max_lifetime, even spread for gthread) and the same trivial app
(bench/hello_app.py, bench/hello_asgi_app.py for the asyncio classes): 2 workers (4
threads) for sync and gthread, 1 for gevent, asgi and uvicorn (BENCH_HELLO_WORKERS sets one
count for all). Those three classes serve every connection of a worker on one loop and take
them with the kernel's accept, so two workers split wrk's connections at random each round,
and the split, not the server, decided a round: the rounds of each side were bimodal (asgi
13k or 19k req/s at the same CPU per request). ``wrk`` (16 keep-alive connections,
BENCH_HELLO_CONNECTIONS, one thread; a bounded Python load generator when wrk is missing) loads one of them at a time, BENCH_HELLO_ROUNDS rounds of
BENCH_HELLO_SECONDS each, plain and ours alternating (the order flips every round).

The client is a pinned one: it sends the route cookie naming the backend (``gx_route=...``,
the same header to both sides), as every request after a client's first does behind nginx.
BENCH_HELLO_COOKIE=0 sends none, so every response of ours carries a ``Set-Cookie``.

Per side and class: the median req/s with its range, and the server CPU (master plus
workers, user plus system) per request, which depends far less than req/s on what else
runs on the machine. Target: our median req/s at least 97% of plain's. Beside it, for
reading a noisy machine, the median of the rounds' own ratios ("paired": each round's
plain and ours ran back to back). Writes bench/results/hello.json. A miss prints FAIL and
does not fail the run; a crash does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

import _wrk  # noqa: E402
from harness import Gunicorn, running_gunicorn  # noqa: E402

from gunicorn_ext.sticky import route_name  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_HELLO_ROUNDS", "5"))
SECONDS = float(os.environ.get("BENCH_HELLO_SECONDS", "4"))
CONNECTIONS = int(os.environ.get("BENCH_HELLO_CONNECTIONS", "16"))
WARMUP_SECONDS = 1.0
#: Workers per class (see the module docstring); BENCH_HELLO_WORKERS overrides for all.
ONE_LOOP_CLASSES = ("gevent", "asgi", "uvicorn_worker.UvicornWorker")
WORKERS_ENV = os.environ.get("BENCH_HELLO_WORKERS")
SEND_COOKIE = os.environ.get("BENCH_HELLO_COOKIE", "1") != "0"
TARGET = 0.97  # ours >= 97% of plain req/s
ASGI_CLASSES = ("asgi", "uvicorn_worker.UvicornWorker")
_DEFAULT_CLASSES = ["sync", "gthread", "gevent", "asgi"]
if importlib.util.find_spec("uvicorn_worker") is not None:
    _DEFAULT_CLASSES.append("uvicorn_worker.UvicornWorker")
CLASSES = [c for c in os.environ.get("BENCH_HELLO_CLASSES", ",".join(_DEFAULT_CLASSES)).split(",")
           if c]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def server_cpu(g: Gunicorn) -> float | None:
    """User+system seconds used so far by a Gunicorn master and its live workers."""
    import psutil

    try:
        master = psutil.Process(g.master_pid)
        procs = [master, *master.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            return None  # a worker went away mid-round: no figure for this round
        total += t.user + t.system
    return total


def py_load(url: str, seconds: float, connections: int, headers: tuple[str, ...]) -> dict[str, Any]:
    """Bounded fallback when wrk is missing: the Python load generator of bench/ipc.py."""
    from ipc import _py_rps

    if headers:
        log("  (the Python load generator sends no cookie)")
    return _py_rps(url, seconds, connections)


def workers_of(worker_class: str) -> int:
    if WORKERS_ENV:
        return int(WORKERS_ENV)
    return 1 if worker_class in ONE_LOOP_CLASSES else 2


def summary(xs: list[float]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure(worker_class: str, log_dir: Path, wrk: str | None) -> dict[str, Any]:
    app = "hello_asgi_app:app" if worker_class in ASGI_CLASSES else "hello_app:app"
    workers = workers_of(worker_class)
    env = {"HELLO_WORKER_CLASS": worker_class, "HELLO_WORKERS": str(workers)}
    tag = worker_class.rsplit(".", 1)[-1].lower()
    rounds: dict[str, list[dict[str, Any]]] = {"plain": [], "ext": []}
    with running_gunicorn(app, config=str(BENCH / "hello_plain_conf.py"), cwd=str(BENCH),
                          log_dir=str(log_dir), health_path="/", name=f"hello-plain-{tag}",
                          ready_timeout=30.0, env=env) as plain, \
            running_gunicorn(app, config=str(BENCH / "hello_ext_conf.py"), cwd=str(BENCH),
                             log_dir=str(log_dir), health_path="/", name=f"hello-ext-{tag}",
                             ready_timeout=30.0, env=env) as ext:
        plain.wait_workers(workers)
        ext.wait_workers(workers)
        servers = {"plain": plain, "ext": ext}
        # The route cookie of ours names its instance (127.0.0.1:<port>); plain gets the same.
        headers = (f"Cookie: gx_route={route_name(f'127.0.0.1:{ext.port}')}",) if SEND_COOKIE else ()

        def load(g: Gunicorn, seconds: float) -> dict[str, Any]:
            if wrk:
                return _wrk.run(wrk, g.url("/"), seconds, CONNECTIONS, headers)
            return py_load(g.url("/"), seconds, CONNECTIONS, headers)

        for g in servers.values():
            load(g, WARMUP_SECONDS)
        log(f"{worker_class}, {workers} worker{'s' if workers > 1 else ''}: {ROUNDS} rounds of {SECONDS:g}s, plain/ours alternating "
            f"({'wrk' if wrk else 'python load generator'}, {CONNECTIONS} connections"
            f"{', pinned client' if SEND_COOKIE else ', no cookie'})")
        for r in range(ROUNDS):
            for key in (["plain", "ext"] if r % 2 == 0 else ["ext", "plain"]):
                g = servers[key]
                cpu0 = server_cpu(g)
                res = load(g, SECONDS)
                cpu1 = server_cpu(g)
                if res.get("requests") and cpu0 is not None and cpu1 is not None:
                    res["server_cpu_us_per_req"] = (cpu1 - cpu0) / res["requests"] * 1e6
                rounds[key].append(res)
            p, e = rounds["plain"][-1], rounds["ext"][-1]
            log(f"  round {r + 1}: plain {p['rps']:,.0f} req/s "
                f"({p.get('server_cpu_us_per_req', float('nan')):.0f} us CPU/req), "
                f"ours {e['rps']:,.0f} req/s ({e.get('server_cpu_us_per_req', float('nan')):.0f} "
                f"us CPU/req), ours/plain {e['rps'] / p['rps']:.1%}")
        errors = []
        for key, g in servers.items():
            if "Traceback" in g.log_text():
                errors.append(f"traceback in the {key} {worker_class} log:\n{g.log_text_tail()}")
    out: dict[str, Any] = {"workers": workers, "rounds": rounds, "errors": errors}
    for key in ("plain", "ext"):
        out[key] = {"rps": summary([r["rps"] for r in rounds[key]]),
                    "cpu_us_per_req": summary([r.get("server_cpu_us_per_req") for r in rounds[key]]),
                    "failed": sum(r.get("non_2xx", 0) + sum(r.get("socket_errors", {}).values())
                                  for r in rounds[key])}
    pm, em = out["plain"]["rps"]["median"], out["ext"]["rps"]["median"]
    out["ext_vs_plain"] = em / pm if pm and em else None
    out["paired_ratios"] = [e["rps"] / p["rps"] for p, e in zip(rounds["plain"], rounds["ext"],
                                                                 strict=True) if p["rps"]]
    out["paired_median"] = statistics.median(out["paired_ratios"]) if out["paired_ratios"] else None
    pc, ec = out["plain"]["cpu_us_per_req"]["median"], out["ext"]["cpu_us_per_req"]["median"]
    out["cpu_per_req_vs_plain"] = ec / pc if pc and ec else None
    return out


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    wrk = shutil.which("wrk")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-hello-"))
    started = time.time()
    by_class: dict[str, Any] = {}
    errors: list[str] = []
    try:
        for c in CLASSES:
            by_class[c] = measure(c, log_dir, wrk)
            errors += by_class[c]["errors"]
    except Exception:
        errors.append(traceback.format_exc())
        log(errors[-1])
    log("")
    log(f"== hello world, median of {ROUNDS} rounds [min-max] (target: ours >= "
        f"{TARGET:.0%} of plain)")
    log(f"  {'class':<30} {'workers':>7} {'plain req/s':>24} {'ours req/s':>24} {'ours/plain':>10} "
        f"{'CPU/req plain':>14} {'ours':>8} {'':>6} {'paired':>7}")
    targets: dict[str, bool | None] = {}
    for c, h in by_class.items():
        p, e = h["plain"], h["ext"]
        ratio = h["ext_vs_plain"]
        targets[c] = None if ratio is None else ratio >= TARGET
        rng = lambda s: f"{s['median']:,.0f} [{s['min']:,.0f}-{s['max']:,.0f}]"  # noqa: E731
        cpu = lambda s: "n/a" if s["median"] is None else f"{s['median']:.0f} us"  # noqa: E731
        verdict = "n/a" if targets[c] is None else "PASS" if targets[c] else "FAIL"
        log(f"  {c:<30} {h['workers']:>7} {rng(p['rps']):>24} {rng(e['rps']):>24} "
            f"{'n/a' if ratio is None else f'{ratio:.1%}':>10} {cpu(p['cpu_us_per_req']):>14} "
            f"{cpu(e['cpu_us_per_req']):>8} {verdict:>6} "
            f"{'n/a' if h['paired_median'] is None else format(h['paired_median'], '.1%'):>7}")
        if p["failed"] or e["failed"]:
            errors.append(f"{c}: failed requests: plain {p['failed']}, ours {e['failed']}")
    out = {
        "bench": "hello",
        "started": started,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus_usable": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_generator": "wrk" if wrk else "python"},
        "params": {"rounds": ROUNDS, "seconds": SECONDS, "connections": CONNECTIONS,
                   "workers": {c: workers_of(c) for c in CLASSES}, "gthread_threads": 4, "pinned_cookie": SEND_COOKIE,
                   "classes": CLASSES},
        "results": by_class,
        "targets": {f"{c}_at_least_97pct_plain": t for c, t in targets.items()},
        "errors": errors,
    }
    path = RESULTS / "hello.json"
    path.write_text(json.dumps(out, indent=1))
    log(f"wrote {path}")
    for err in errors:
        log(f"ERROR: {err}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
