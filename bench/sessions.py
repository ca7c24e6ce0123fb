"""Sessions: gunicorn_ext.state.flask vs Flask-Session 0.8 vs Flask's cookie session, in one run.

Each backend serves the same app (bench/sessions_app.py) from real Gunicorn
(2 sync workers) against the same real redis-server. Measured per backend:

* req/s of three endpoints (wrk, one client cookie): ``/write`` (read-modify-write),
  ``/read`` (read only) and ``/set`` (a write that doesn't read first);
* Redis commands per request (``INFO commandstats`` deltas over the wrk run);
* server CPU per request: the workers' and redis-server's user+system CPU over the
  wrk run, divided by the requests done (steadier than req/s on a shared machine);
* Redis round trips per request, counted by the server (``total_reads_processed``
  deltas) while Flask's test client sends requests one at a time, in-process;
* the floor under any session on Redis, measured on the cookie backend's server in
  the same rounds: ``/none`` (the same request without a session), ``/roundtrip``
  (that request plus one redis-py HGETALL of a session-sized hash, the command a
  load makes) and ``/roundtrip2`` (plus an HSET after it: a read-modify-write's two),
  through a redis-py client holding its connection (its cheapest path). A request
  needing one round trip costs at least ``/roundtrip``, one needing two at least
  ``/roundtrip2``, whatever its session code does. When that floor is above 0.85x
  Flask-Session's CPU, no session making those round trips through redis-py can meet
  that target.

Rounds alternate the backends (each round runs all three, in a rotating order);
figures are medians with their range. Writes bench/results/sessions.json and
sessions.svg. Targets, per endpoint: req/s >= 1.2x Flask-Session, server CPU per
request <= 0.85x Flask-Session's; Redis round trips 1 for a read, 1 for a write that
doesn't read first, 2 for a read-modify-write (the load, then the save).
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
ROUNDS = int(os.environ.get("BENCH_SESSION_ROUNDS", "5"))
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
    res = _wrk.run(wrk, url, SECONDS, CONNECTIONS, (f"Cookie: {cookie}",) if cookie else ())
    if res["non_2xx"]:
        raise RuntimeError(f"{res['non_2xx']} failed responses from {url}")
    return res["rps"], res["requests"] or 0


def _py_load(url: str, cookie: str) -> tuple[float, int]:
    """Bounded fallback without wrk: one thread, keep-alive, SECONDS or 20k requests."""
    s = requests.Session()
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < SECONDS and n < 20000:
        s.get(url, headers={"Cookie": cookie} if cookie else {}, timeout=5).raise_for_status()
        n += 1
    return n / (time.monotonic() - t0), n


def _server_reads(r: Any) -> int:
    """Reads processed by the server (INFO stats); each round trip of a client is one."""
    return int(r.info("stats")["total_reads_processed"])


ENDPOINTS = ("write", "read", "set")
# Redis round trips a request should cost on ours: the load, then the save.
TRIPS_TARGET = {"write": 2.0, "read": 1.0, "set": 1.0}
CPU_TARGET = 0.85


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
    for endpoint in ENDPOINTS:
        before = _server_reads(r)
        for _ in range(100):
            assert client.get(f"/{endpoint}").status_code == 200
        out[endpoint] = (_server_reads(r) - before - 1) / 100
    return out


def _med(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results: dict[str, dict[str, list[float]]] = {i: {e: [] for e in ENDPOINTS} for i in IMPLS}
    cpu_us: dict[str, dict[str, list[float]]] = {i: {e: [] for e in ENDPOINTS} for i in IMPLS}
    commands: dict[str, dict[str, float]] = {i: {} for i in IMPLS}
    # on the cookie backend's server: a request without a session, and with one round trip
    floor_us: dict[str, list[float]] = {"none": [], "roundtrip": [], "roundtrip2": []}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(tmp) as rs:
        r = rs.client()
        assert rs.proc is not None
        rs_pid = rs.proc.pid
        trips = {i: _roundtrips(i, rs.url, r) for i in ("ours", "flask_session")}
        for rnd in range(ROUNDS):
            # alternate: each round runs every backend once, in a rotating order
            order = IMPLS[rnd % len(IMPLS):] + IMPLS[:rnd % len(IMPLS)]
            for impl in order:
                env = {"SESSION_IMPL": impl, "REDIS_URL": rs.url, "PYTHONPATH": str(ROOT)}
                with running_gunicorn("sessions_app:app", cwd=str(BENCH), workers=2,
                                      log_dir=tmp, env=env, name=f"sessions-{impl}") as g:
                    resp = requests.get(g.url("/write"), timeout=10)
                    cookie = "; ".join(f"{k}={v}" for k, v in resp.cookies.items())
                    pids = [*g.worker_pids(), rs_pid]
                    for endpoint in ENDPOINTS:
                        r.config_resetstat()
                        cpu0 = _cpu_seconds(pids)
                        rps, n = _load(g.url(f"/{endpoint}"), cookie)
                        cpu_req = (_cpu_seconds(pids) - cpu0) / n * 1e6 if n else 0.0
                        results[impl][endpoint].append(rps)
                        cpu_us[impl][endpoint].append(cpu_req)
                        commands[impl][endpoint] = round(_commands(r) / n, 2) if n else 0.0
                        print(f"  round {rnd + 1} {LABELS[impl]:38s} {endpoint:5s} {rps:9,.0f} req/s"
                              f"  {cpu_req:5.0f} us server CPU/request"
                              f"  {commands[impl][endpoint]:.2f} redis commands/request", flush=True)
                    for endpoint in floor_us if impl == "cookie" else ():
                        cpu0 = _cpu_seconds(pids)
                        _, n = _load(g.url(f"/{endpoint}"), "")
                        floor_us[endpoint].append((_cpu_seconds(pids) - cpu0) / n * 1e6 if n else 0.0)

    rps = {i: {e: _med(results[i][e]) for e in ENDPOINTS} for i in IMPLS}
    cpu = {i: {e: _med(cpu_us[i][e]) for e in ENDPOINTS} for i in IMPLS}

    bare = _med(floor_us["none"])
    trip = _med(floor_us["roundtrip"]) - bare
    floor = {e: _med(floor_us["roundtrip2" if TRIPS_TARGET[e] == 2 else "roundtrip"])
             for e in ENDPOINTS}

    def rng(v: list[float]) -> str:
        return f"{min(v):,.0f}-{max(v):,.0f}"

    out: dict[str, Any] = {
        "req_per_s_median": rps,
        "server_cpu_us_per_request_median": cpu,
        "roundtrips_per_request": trips,
        "redis_commands_per_request": commands,
        "floor": {"no_session_cpu_us": bare, "roundtrip_cpu_us": trip,
                  "cpu_us_per_request": floor, "rounds": floor_us},
        "ratios": {
            e: {"rps_vs_flask_session": rps["ours"][e] / rps["flask_session"][e],
                "cpu_vs_flask_session": cpu["ours"][e] / cpu["flask_session"][e],
                "rps_vs_cookie": rps["ours"][e] / rps["cookie"][e]}
            for e in ENDPOINTS},
        "rounds": {"req_per_s": results, "server_cpu_us_per_request": cpu_us},
        "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                    "load_generator": "wrk" if shutil.which("wrk") else "python",
                    "rounds": ROUNDS, "seconds_per_run": SECONDS, "connections": CONNECTIONS},
    }
    print(f"\n== sessions, 2 sync workers, median (range) of {ROUNDS} alternating rounds")
    for e in ENDPOINTS:
        print(f"  {e:5s} req/s: ours {rps['ours'][e]:7,.0f} ({rng(results['ours'][e])})"
              f"   Flask-Session 0.8 {rps['flask_session'][e]:7,.0f} ({rng(results['flask_session'][e])})"
              f"   cookie {rps['cookie'][e]:7,.0f} ({rng(results['cookie'][e])})"
              f"   ours/Flask-Session {rps['ours'][e] / rps['flask_session'][e]:.2f}x")
    for e in ENDPOINTS:
        print(f"  {e:5s} server CPU us/request (workers + redis): ours {cpu['ours'][e]:.0f}"
              f" ({rng(cpu_us['ours'][e])})   Flask-Session {cpu['flask_session'][e]:.0f}"
              f" ({rng(cpu_us['flask_session'][e])})   cookie {cpu['cookie'][e]:.0f}"
              f" ({rng(cpu_us['cookie'][e])})   ours/Flask-Session "
              f"{cpu['ours'][e] / cpu['flask_session'][e]:.2f}x")
    print(f"  redis round trips per request: ours {trips['ours']}, "
          f"Flask-Session {trips['flask_session']}")
    print(f"  floor: a request without a session {bare:.0f} us ({rng(floor_us['none'])}), one"
          f" redis-py round trip {trip:.0f} us more ({rng(floor_us['roundtrip'])} with it),"
          f" two {_med(floor_us['roundtrip2']):.0f} us ({rng(floor_us['roundtrip2'])})")
    for e in ENDPOINTS:
        print(f"  {e:5s} floor with {TRIPS_TARGET[e]:.0f} round trip(s): {floor[e]:.0f} us;"
              f" {CPU_TARGET}x Flask-Session is {CPU_TARGET * cpu['flask_session'][e]:.0f} us;"
              f" ours {cpu['ours'][e]:.0f} us, {cpu['ours'][e] - floor[e]:.0f} us above the floor")
    for e in ENDPOINTS:
        ok = rps["ours"][e] >= TARGET * rps["flask_session"][e]
        print(f"{'PASS' if ok else 'FAIL'}: {e} req/s >= {TARGET}x Flask-Session: "
              f"{rps['ours'][e] / rps['flask_session'][e]:.2f}x")
        ok = cpu["ours"][e] <= CPU_TARGET * cpu["flask_session"][e]
        print(f"{'PASS' if ok else 'FAIL'}: {e} server CPU/request <= {CPU_TARGET}x Flask-Session: "
              f"{cpu['ours'][e] / cpu['flask_session'][e]:.2f}x")
        ok = trips["ours"][e] <= TRIPS_TARGET[e]
        print(f"{'PASS' if ok else 'FAIL'}: {e} Redis round trips <= {TRIPS_TARGET[e]:.0f}: "
              f"{trips['ours'][e]}")
    (RESULTS / "sessions.json").write_text(json.dumps(out, indent=2))
    panels = [Panel(f"{e} endpoint", "req/s", [(e, [Bar(LABELS[i], rps[i][e], i == "ours")
                                                    for i in IMPLS])]) for e in ENDPOINTS]
    write_svg(RESULTS / "sessions.svg", "Flask sessions on Redis (2 sync workers)", panels)
    print(f"results: {RESULTS / 'sessions.json'}; plot: {RESULTS / 'sessions.svg'} "
          f"({time.monotonic() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
