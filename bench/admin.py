"""Admin endpoint latency: the primary's own /metrics beside the app port's, in one run.

    .venv/bin/python bench/admin.py          (also run by `make bench`)

One gunicorn-ext instance with the example's config (examples/flask_app/cluster_conf.py,
2 gthread workers, ADMIN_BIND set), measured three ways, each time the admin endpoint's
``GET /metrics`` (served by the primary) beside the app port's ``GET /metrics`` (served
by a worker, which asks the primary over the bus: what the example does):

1. idle: the baseline;
2. saturated: wrk (or, without it, a bounded Python load generator) keeps 128 keep-alive
   connections busy on the example's ``/whoami`` for LOAD_SECONDS, while each /metrics
   is fetched every 50 ms on a fresh connection;
3. blocked: every worker thread is held by ``/block`` (bench/admin_app.py, 2 workers x
   4 threads, each worker sent its share on its own per-worker port).

Each side gets PROBES sequential requests (fresh connection, 2 s timeout); a timeout
counts as unanswered. Target: admin p99 under 100 ms in every phase. Writes
bench/results/admin.json. Only 127.0.0.1 is ever a target; every loop is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

import _wrk  # noqa: E402
from harness import Gunicorn, free_port, free_port_pair, wait_for  # noqa: E402

EXAMPLE = ROOT / "examples" / "flask_app"
CONF = EXAMPLE / "cluster_conf.py"
PROBES = int(os.environ.get("BENCH_ADMIN_PROBES", "100"))
LOAD_SECONDS = float(os.environ.get("BENCH_ADMIN_LOAD_SECONDS", "10"))
CONNECTIONS = 128
PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 2.0
BLOCKED_PROBES = 5  # app-port attempts while blocked: each costs PROBE_TIMEOUT
THREADS = 4
WORKERS = 2
MAX_PY_REQUESTS = 200_000  # bound of the fallback load generator
TARGET_P99_S = 0.1


def log(msg: str = "") -> None:
    print(msg, flush=True)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def summary(lat: list[float], unanswered: int) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)
    return {"answered": len(lat), "unanswered": unanswered, "p50_ms": r(pct(lat, 50)),
            "p90_ms": r(pct(lat, 90)), "p99_ms": r(pct(lat, 99)), "max_ms": r(max(lat, default=None))}


def show(v: dict[str, Any]) -> str:
    if not v["answered"]:
        return f"no answer within {PROBE_TIMEOUT:g} s ({v['unanswered']} of {v['unanswered']})"
    s = f"p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, max {v['max_ms']:.1f} ms"
    return s + (f", {v['unanswered']} unanswered" if v["unanswered"] else "")


def probe(port: int, n: int, interval: float = 0.0, stop: threading.Event | None = None) -> dict[str, Any]:
    """``n`` sequential GET /metrics on fresh connections; latencies of the 200s."""
    lat: list[float] = []
    unanswered = 0
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        t0 = time.perf_counter()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT)
            c.request("GET", "/metrics", headers={"Connection": "close"})
            resp = c.getresponse()
            body = resp.read()
            c.close()
            if resp.status == 200 and b"gunicorn_ext_requests_total" in body:
                lat.append(time.perf_counter() - t0)
            else:
                unanswered += 1
        except OSError:
            unanswered += 1
        if interval:
            time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
    return summary(lat, unanswered)


def both(admin: int, app: int, n: int, interval: float = 0.0) -> dict[str, Any]:
    """Probe the two sides at the same time, in two threads."""
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.__setitem__("app_port", probe(app, n, interval)))
    t.start()
    out["admin"] = probe(admin, n, interval)
    t.join()
    return out


@contextlib.contextmanager
def instance(app: str, cwd: Path, log_dir: Path, env: dict[str, str]) -> Iterator[tuple[Gunicorn, int]]:
    admin = free_port()
    env = {"ADMIN_BIND": f"127.0.0.1:{admin}", "STATE_URL": f"sqlite:///{log_dir}/state.db",
           "SECRET_KEY": "bench", **env}
    g = Gunicorn(app, config=CONF, cwd=cwd, env=env, workers=WORKERS, log_dir=log_dir, name="admin")
    try:
        g.start().wait_ready(60)
        wait_for(lambda: _get(admin, "/readyz") == 200, 30, what="admin readyz")
        yield g, admin
    finally:
        g.stop()


def _get(port: int, path: str, timeout: float = PROBE_TIMEOUT) -> int | None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", path)
        status = c.getresponse().status
        c.close()
        return status
    except OSError:
        return None


def py_load(port: int, seconds: float, stop: threading.Event, counts: list[int]) -> None:
    """Fallback load: keep-alive GET /whoami as fast as it goes, bounded in time and count."""
    deadline = time.monotonic() + seconds
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    n = 0
    while time.monotonic() < deadline and not stop.is_set() and n < MAX_PY_REQUESTS // 16:
        try:
            c.request("GET", "/whoami")
            c.getresponse().read()
            n += 1
        except OSError:
            c.close()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.close()
    counts.append(n)


def phase_saturated(g: Gunicorn, admin: int) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    res: dict[str, Any] = {}
    stop = threading.Event()
    counts: list[int] = []
    if wrk:
        t = threading.Thread(target=lambda: res.__setitem__(
            "load", _wrk.run(wrk, g.url("/whoami"), LOAD_SECONDS, CONNECTIONS)))
        loaders = [t]
    else:
        loaders = [threading.Thread(target=py_load, args=(g.port, LOAD_SECONDS, stop, counts))
                   for _ in range(16)]
    for t in loaders:
        t.start()
    time.sleep(1.0)  # let the load ramp up
    n = min(PROBES, int((LOAD_SECONDS - 2) / PROBE_INTERVAL))
    res.update(both(admin, g.port, n, PROBE_INTERVAL))
    stop.set()
    for t in loaders:
        t.join(timeout=LOAD_SECONDS + 60)
    if not wrk:
        res["load"] = {"rps": round(sum(counts) / LOAD_SECONDS, 1), "generator": "python, 16 threads"}
    return res


def phase_blocked(log_dir: Path) -> dict[str, Any]:
    release = log_dir / "release"
    base = free_port_pair()
    env = {"THREADS": str(THREADS), "BENCH_RELEASE": str(release), "WORKER_PORTS_BASE": str(base)}
    with instance("admin_app:app", BENCH, log_dir, env) as (g, admin):
        blockers = []
        for i in range(WORKERS * THREADS):
            slot = i % WORKERS
            t = threading.Thread(target=_get, args=(base + slot, "/block", 70.0))
            t.start()
            blockers.append(t)

        def all_busy() -> bool:
            c = http.client.HTTPConnection("127.0.0.1", admin, timeout=PROBE_TIMEOUT)
            c.request("GET", "/status")
            doc = json.loads(c.getresponse().read())
            c.close()
            return [w["inflight"] for w in doc["workers"]] == [THREADS] * WORKERS

        try:
            wait_for(all_busy, 20, what="every worker thread blocked")
            out = {"admin": probe(admin, PROBES), "app_port": probe(g.port, BLOCKED_PROBES)}
        finally:
            release.touch()
            for t in blockers:
                t.join(timeout=70)
    return out


def machine_info() -> dict[str, Any]:
    import gunicorn

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "platform": platform.platform(),
            "python": platform.python_version(), "gunicorn": gunicorn.__version__,
            "workers": f"{WORKERS} gthread", "load_generator": "wrk" if shutil.which("wrk") else "python"}


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="gx-admin-"))
    out: dict[str, Any] = {"machine": machine_info(), "probes": PROBES}
    try:
        with instance("app:app", EXAMPLE, log_dir, {}) as (g, admin):
            log(f"1. idle: {PROBES} GET /metrics each side")
            out["idle"] = both(admin, g.port, PROBES)
            log(f"2. saturated: {CONNECTIONS} connections on /whoami for {LOAD_SECONDS:g} s")
            out["saturated"] = phase_saturated(g, admin)
        log(f"3. blocked: all {WORKERS}x{THREADS} worker threads held")
        out["blocked"] = phase_blocked(log_dir)
    except Exception:
        traceback.print_exc()
        log(f"logs kept in {log_dir}")
        return 1
    shutil.rmtree(log_dir, ignore_errors=True)
    ok = all(out[p]["admin"]["unanswered"] == 0 and out[p]["admin"]["p99_ms"] is not None
             and out[p]["admin"]["p99_ms"] <= TARGET_P99_S * 1000 for p in ("idle", "saturated", "blocked"))
    out["target"] = {"admin_p99_ms_max": TARGET_P99_S * 1000, "met": ok}
    log()
    log("GET /metrics latency: the primary's admin endpoint beside the app port (same run)")
    for p in ("idle", "saturated", "blocked"):
        extra = ""
        if p == "saturated":
            extra = f"   [load: {out[p]['load'].get('rps', 0):.0f} req/s on /whoami]"
        log(f"  {p:<10} admin:    {show(out[p]['admin'])}{extra}")
        log(f"  {'':<10} app port: {show(out[p]['app_port'])}")
    log(f"target: admin p99 <= {TARGET_P99_S * 1000:.0f} ms in every phase: {'PASS' if ok else 'FAIL'}")
    (RESULTS / "admin.json").write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {RESULTS / 'admin.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
