"""Sessions: gunicorn_ext.state.flask vs Flask-Session 0.8 vs Flask's cookie session, in one run.

Each backend serves the same app (bench/sessions_app.py) from real Gunicorn
(2 sync workers) against the same real redis-server. Measured per backend:

* req/s of a session-writing and a read-only endpoint (wrk, one client cookie);
* Redis commands per request (``INFO commandstats`` deltas over the wrk run);
* server CPU per request: the workers' and redis-server's user+system CPU over the
  wrk run, divided by the requests done (steadier than req/s on a shared machine);
* Redis round trips per request, counted by the server (``total_reads_processed``
  deltas) while Flask's test client sends requests one at a time, in-process.

Writes bench/results/sessions.json and sessions.svg. Targets: req/s >= 1.2x
Flask-Session; one round trip per request.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

import _wrk  # noqa: E402
from harness import RedisServer, running_gunicorn  # noqa: E402
from plot import Bar, Panel, write_svg  # noqa: E402

IMPLS = ("ours", "flask_session", "cookie")
LABELS = {"ours": "gunicorn-ext gunicorn_ext.state.flask", "flask_session": "Flask-Session 0.8",
          "cookie": "Flask cookie session"}
SECONDS = int(os.environ.get("BENCH_SESSION_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_SESSION_ROUNDS", "3"))
CONNECTIONS = 4
TARGET = 1.2


def _commands(r: Any) -> int:
    stats = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config"))


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (those still alive)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _load(url: str, cookie: str) -> tuple[float, int]:
    """(req/s, requests completed)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return _py_load(url, cookie)
    res = _wrk.run(wrk, url, SECONDS, CONNECTIONS, (f"Cookie: {cookie}",))
    if res["non_2xx"]:
        raise RuntimeError(f"{res['non_2xx']} failed responses from {url}")
    return res["rps"], res["requests"] or 0


def _py_load(url: str, cookie: str) -> tuple[float, int]:
    """Bounded fallback without wrk: one thread, keep-alive, SECONDS or 20k requests."""
    s = requests.Session()
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < SECONDS and n < 20000:
        s.get(url, headers={"Cookie": cookie}, timeout=5).raise_for_status()
        n += 1
    return n / (time.monotonic() - t0), n


def _server_reads(r: Any) -> int:
    """Reads processed by the server (INFO stats); each round trip of a client is one."""
    return int(r.info("stats")["total_reads_processed"])


def _roundtrips(impl: str, redis_url: str, r: Any) -> dict[str, float]:
    """Redis round trips per request, in-process (Flask's test client, one at a time),
    counted by the server: its ``total_reads_processed`` delta, less the INFO's own."""
    os.environ["SESSION_IMPL"] = impl
    os.environ["REDIS_URL"] = redis_url
    sys.modules.pop("sessions_app", None)
    mod = importlib.import_module("sessions_app")
    client = mod.app.test_client()
    client.get("/write")
    out = {}
    for path in ("/write", "/read"):
        before = _server_reads(r)
        for _ in range(100):
            assert client.get(path).status_code == 200
        out[path.strip("/")] = (_server_reads(r) - before - 1) / 100
    return out


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results: dict[str, dict[str, list[float]]] = {i: {"write": [], "read": []} for i in IMPLS}
    cpu_us: dict[str, dict[str, list[float]]] = {i: {"write": [], "read": []} for i in IMPLS}
    commands: dict[str, dict[str, float]] = {i: {} for i in IMPLS}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(tmp) as rs:
        r = rs.client()
        assert rs.proc is not None
        rs_pid = rs.proc.pid
        trips = {i: _roundtrips(i, rs.url, r) for i in ("ours", "flask_session")}
        for rnd in range(ROUNDS):
            for impl in IMPLS:
                env = {"SESSION_IMPL": impl, "REDIS_URL": rs.url, "PYTHONPATH": str(ROOT)}
                with running_gunicorn("sessions_app:app", cwd=str(BENCH), workers=2,
                                      log_dir=tmp, env=env, name=f"sessions-{impl}") as g:
                    resp = requests.get(g.url("/write"), timeout=10)
                    cookie = "; ".join(f"{k}={v}" for k, v in resp.cookies.items())
                    pids = [*g.worker_pids(), rs_pid]
                    for endpoint in ("write", "read"):
                        r.config_resetstat()
                        cpu0 = _cpu_seconds(pids)
                        rps, n = _load(g.url(f"/{endpoint}"), cookie)
                        cpu_req = (_cpu_seconds(pids) - cpu0) / n * 1e6 if n else 0.0
                        results[impl][endpoint].append(rps)
                        cpu_us[impl][endpoint].append(cpu_req)
                        commands[impl][endpoint] = round(_commands(r) / n, 2) if n else 0.0
                        print(f"  round {rnd + 1} {LABELS[impl]:26s} {endpoint:5s} {rps:9,.0f} req/s"
                              f"  {cpu_req:5.0f} us server CPU/request"
                              f"  {commands[impl][endpoint]:.2f} redis commands/request", flush=True)

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    rps = {i: {e: med(results[i][e]) for e in ("write", "read")} for i in IMPLS}
    cpu = {i: {e: med(cpu_us[i][e]) for e in ("write", "read")} for i in IMPLS}
    out: dict[str, Any] = {
        "ours_write_rps": rps["ours"]["write"],
        "flask_session_write_rps": rps["flask_session"]["write"],
        "cookie_write_rps": rps["cookie"]["write"],
        "ours_read_rps": rps["ours"]["read"],
        "flask_session_read_rps": rps["flask_session"]["read"],
        "cookie_read_rps": rps["cookie"]["read"],
        "ours_roundtrips_per_request": trips["ours"],
        "flask_session_roundtrips_per_request": trips["flask_session"],
        "redis_commands_per_request": commands,
        "server_cpu_us_per_request": cpu,
        "ratios": {
            "write_vs_flask_session": rps["ours"]["write"] / rps["flask_session"]["write"],
            "read_vs_flask_session": rps["ours"]["read"] / rps["flask_session"]["read"],
        },
        "rounds": results,
        "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                    "load_generator": "wrk" if shutil.which("wrk") else "python"},
    }
    print("\n== sessions, 2 sync workers, median of rounds")
    for e in ("write", "read"):
        print(f"  {e:5s}  ours {rps['ours'][e]:8,.0f}   Flask-Session 0.8 {rps['flask_session'][e]:8,.0f}"
              f"   cookie {rps['cookie'][e]:8,.0f} req/s   ours/Flask-Session "
              f"{rps['ours'][e] / rps['flask_session'][e]:.2f}x")
    for e in ("write", "read"):
        print(f"  {e:5s}  server CPU per request (workers + redis): ours {cpu['ours'][e]:.0f} us,"
              f"  Flask-Session {cpu['flask_session'][e]:.0f} us, cookie {cpu['cookie'][e]:.0f} us"
              f"   Flask-Session/ours {cpu['flask_session'][e] / cpu['ours'][e]:.2f}x")
    print(f"  redis round trips per request: ours {trips['ours']}, "
          f"Flask-Session {trips['flask_session']}")
    for e in ("write", "read"):
        ok = rps["ours"][e] >= TARGET * rps["flask_session"][e]
        print(f"{'PASS' if ok else 'FAIL'}: {e} req/s >= {TARGET}x Flask-Session: "
              f"{rps['ours'][e] / rps['flask_session'][e]:.2f}x")
    one = all(v <= 1.0 for v in trips["ours"].values())
    print(f"{'PASS' if one else 'FAIL'}: one Redis round trip per request: {trips['ours']}")
    (RESULTS / "sessions.json").write_text(json.dumps(out, indent=2))
    panels = [Panel(f"{e} endpoint", "req/s", [(e, [Bar(LABELS[i], rps[i][e], i == "ours")
                                                    for i in IMPLS])]) for e in ("write", "read")]
    write_svg(RESULTS / "sessions.svg", "Flask sessions on Redis (2 sync workers)", panels)
    print(f"results: {RESULTS / 'sessions.json'}; plot: {RESULTS / 'sessions.svg'} "
          f"({time.monotonic() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
