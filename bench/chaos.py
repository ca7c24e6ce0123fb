"""Chaos benchmark: faults under load, two instances of the example behind nginx.

    .venv/bin/python bench/chaos.py        (also run by `make bench`)

Each run starts, for every side, two instances of the example app (examples/flask_app,
started as `make run` does: cluster_conf.py, env BIND/WORKERS/STATE_URL/SECRET_KEY;
WORKERS=3) behind nginx with the config `gunicorn-ext nginx render` produces for both,
on one real redis-server (appendonly yes). The sides, in the same run:

* ``gunicorn-ext``: the example as shipped, the rendered config;
* ``plain Gunicorn``: the same app under plain Gunicorn (tests/apps/example_plain_conf.py:
  the same settings without gunicorn-ext), the same nginx config;
* ``gunicorn-ext, main's nginx``: the example behind the config main rendered before
  issue 9 (``max_fails=2 fail_timeout=10s``, retries on ``http_502 http_503``), the
  measurement behind the thresholds the templates now use.

Cases (tests/chaos_cases.py), 16 client threads, each with its own cookies:

1. a worker SIGKILLed every 0.5 s for BENCH_CHAOS_KILL_SECONDS (60) s, alternating the
   instances, under ``GET /whoami``; target <= 0.5% failed and, at the end, every slot
   of both instances serving with no operator action;
2. redis-server SIGKILLed for BENCH_CHAOS_REDIS_DOWN (10) s under /healthz, /whoami
   (no store) and /counter, /hits (store); targets: 0 failures without the store, 503 +
   Retry-After with it, first 200 within 1 s of Redis answering, no session lost;
3. a boot-failing app: instance 0 runs the example through tests/apps/boot_fault_app.py
   (its workers exit 1 before ready while a file exists), its workers are SIGKILLed
   under load, and the fault is fixed after BENCH_CHAOS_BROKEN_FOR (20) s; targets: the
   crash loop stops within the breaker's bounds (restart_breaker_failures per slot, then
   one half-open try per cool-down), <= 0.5% of requests fail meanwhile (those in flight
   on the killed workers; the instance refuses, nginx fails over), and every slot serves
   again after the fix with no operator action (half-open). gunicorn-ext and plain only.

Writes bench/results/chaos.json and chaos_kills.svg / chaos_redis.svg / chaos_boot.svg (answers and
failures per second). Targets print as PASS/FAIL; a miss does not fail the run, a crash
does. Every process is stopped at the end; only loopback is ever a target.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

from chaos_cases import boot_failure, redis_outage, worker_kills  # noqa: E402
from example_cluster import APPS, example_cluster  # noqa: E402
from harness import RedisServer  # noqa: E402
from plot_lines import Marker, Series, Span, write_line_svg  # noqa: E402

from gunicorn_ext.nginx import find_nginx, render  # noqa: E402

KILL_SECONDS = float(os.environ.get("BENCH_CHAOS_KILL_SECONDS", "60"))
REDIS_DOWN = float(os.environ.get("BENCH_CHAOS_REDIS_DOWN", "10"))
BROKEN_FOR = float(os.environ.get("BENCH_CHAOS_BROKEN_FOR", "20"))
#: The example's breaker (gunicorn-ext's defaults): 10 unstable exits per slot in 60 s,
#: then a 30 s cool-down before the half-open try.
BREAKER_FAILURES, BREAKER_COOLDOWN = 10, 30.0
WORKERS = 3
CLIENTS = 16
FAIL_TARGET_PCT = 0.5

SIDES = {
    "ext": ("gunicorn-ext", "ext"),
    "plain": ("plain Gunicorn", "plain"),
    "ext_main_nginx": ("gunicorn-ext, main's nginx", "ext"),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def main_nginx(backends: list[str], listen: int) -> str:
    """The config main rendered before issue 9: passive ejection and 503 retries."""
    text = render(backends, listen, "127.0.0.1", default_server=False)
    text = re.sub(r"(server \S+) max_fails=0;", r"\1 max_fails=2 fail_timeout=10s;", text)
    text = re.sub(r"(server \S+) backup max_fails=0;", r"\1 backup;", text)
    return text.replace("proxy_next_upstream error timeout;",
                        "proxy_next_upstream error timeout http_502 http_503;")


def run_side(side: str, case: str, tmp: Path) -> dict[str, Any]:
    label, kind = SIDES[side]
    d = tmp / f"{case}-{side}"
    redis = RedisServer(d / "redis", extra_args=["--appendonly", "yes"])
    (d / "redis").mkdir(parents=True, exist_ok=True)
    redis.start()
    try:
        conf = main_nginx if side == "ext_main_nginx" else None
        fault = d / "boot-fault"
        boot = case == "boot"
        app = "boot_fault_app:app" if boot else "app:app"
        env = {"PYTHONPATH": str(APPS), "BOOT_FAULT": str(fault)} if boot else None
        with example_cluster(d, kind=kind, workers=WORKERS, redis=redis, conf=conf,
                             app=app, env=env) as c:
            if case == "kills":
                res = worker_kills(c, seconds=KILL_SECONDS, clients=CLIENTS)
            elif case == "redis":
                res = redis_outage(c, down=REDIS_DOWN, clients=CLIENTS)
            else:
                res = boot_failure(c, fault, broken_for=BROKEN_FOR,
                                   settle=BREAKER_COOLDOWN * 2 + 30, clients=CLIENTS)
            errors = c.nginx_errors().splitlines()
            # Lines, one per failed attempt (connection refused or reset, timeout).
            res["nginx_failed_attempts"] = sum(1 for line in errors if "upstream" in line)
            res["no_live_upstreams"] = sum(1 for line in errors if "no live upstreams" in line)
            res["tracebacks"] = sum(g.log_text().count("Traceback") for g in c.instances)
            res["breaker_lines"] = sum(g.log_text().lower().count("breaker") for g in c.instances)
    finally:
        redis.stop()
    res["label"] = label
    return res


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_kills(res: dict[str, dict[str, Any]]) -> None:
    log(f"\n1. worker SIGKILL every 0.5 s for {KILL_SECONDS:.0f} s, {CLIENTS} clients on GET /whoami")
    log(f"   {'':28}{'requests':>9}{'failed':>8}{'failed %':>10}{'kills':>7}  end: serving workers")
    for side in SIDES:
        r = res[side]
        log(f"   {r['label']:28}{r['requests']:>9,}{r['failed']:>8,}{r['failed_pct']:>9.3f}%"
            f"{r['kills']:>7}  {r['serving_workers']} of {WORKERS} each"
            f"{'' if r['every_slot_serves'] else ' (NOT all)'}  {r['failures_by_status']}")
    e = res["ext"]
    log(f"   target gunicorn-ext <= {FAIL_TARGET_PCT}% failed: "
        f"{verdict(e['failed_pct'] <= FAIL_TARGET_PCT)} ({e['failed_pct']:.3f}%, plain Gunicorn "
        f"{res['plain']['failed_pct']:.3f}%, main's nginx {res['ext_main_nginx']['failed_pct']:.2f}%)")
    log(f"   target every slot serves at the end, no operator action: "
        f"{verdict(e['every_slot_serves'])} (plain Gunicorn: {res['plain']['every_slot_serves']})")


def report_redis(res: dict[str, dict[str, Any]]) -> None:
    log(f"\n2. redis-server SIGKILLed for {REDIS_DOWN:.0f} s, {CLIENTS} clients on "
        "/healthz /whoami /counter /hits")
    log(f"   {'':28}{'no-store failed':>16}{'store 503+RA':>14}{'store other':>12}"
        f"{'first 200':>11}{'sessions lost':>15}")
    for side in SIDES:
        r = res[side]
        first = r["first_store_200_after_redis_up_s"]
        log(f"   {r['label']:28}{r['free_failed']:>8,} of {r['free_requests']:<6,}"
            f"{r['store_503_with_retry_after']:>14,}{r['store_other_failures']:>12,}"
            f"{'-' if first is None else f'{first:.3f} s':>11}"
            f"{r['sessions_lost']:>9} of {r['sessions']}")
    e = res["ext"]
    first = e["first_store_200_after_redis_up_s"]
    log(f"   target 0 failures without the store: {verdict(e['free_failed'] == 0)}; "
        f"store routes 503 + Retry-After only: {verdict(e['store_other_failures'] == 0)}; "
        f"first 200 within 1 s: {verdict(first is not None and first <= 1.0)}; "
        f"no session lost: {verdict(e['sessions_lost'] == 0)}")


def report_boot(res: dict[str, dict[str, Any]]) -> None:
    log(f"\n3. boot-failing app on instance 0 for {BROKEN_FOR:.0f} s (workers exit 1 before "
        f"ready), {CLIENTS} clients on GET /whoami")
    log(f"   {'':28}{'boots broken':>13}{'last half':>10}{'failed':>8}{'failed %':>10}"
        "  back after fix")
    for r in res.values():
        back = r["recovered_after_fix_s"]
        log(f"   {r['label']:28}{r['boots_while_broken']:>13,}{r['boots_last_half']:>10,}"
            f"{r['failed']:>8,}{r['failed_pct']:>9.3f}%  "
            f"{'never' if back is None else f'{back:.1f} s'}  {r['failures_by_status']}")
    e = res["ext"]
    bound = WORKERS * (BREAKER_FAILURES + 1)
    log(f"   target boots while broken <= {WORKERS} slots x ({BREAKER_FAILURES} + 1 half-open): "
        f"{verdict(e['boots_while_broken'] <= bound)} ({e['boots_while_broken']}, plain Gunicorn "
        f"{res['plain']['boots_while_broken']}); <= {FAIL_TARGET_PCT}% failed: "
        f"{verdict(e['failed_pct'] <= FAIL_TARGET_PCT)}; "
        f"back by itself after the fix (half-open): {verdict(e['every_slot_serves'])}")


def plot(case: str, res: dict[str, dict[str, Any]], title: str, marks: list[Marker],
         spans: list[Span]) -> Path:
    series = []
    for side in res:
        tl = res[side]["timeline"]
        label = res[side]["label"]
        series.append(Series(f"{label} 200/s", tl["t"], tl["ok_per_s"], ours=side == "ext",
                             step=True))
        series.append(Series(f"{label} failed/s", tl["t"], tl["failed_per_s"], step=True))
    path = RESULTS / f"chaos_{case}.svg"
    write_line_svg(path, title, series, x_label="s", y_label="answers per second",
                   markers=marks, spans=spans,
                   subtitle="2 instances x 3 workers of the example behind the rendered nginx, "
                            f"{CLIENTS} clients")
    return path


def main() -> int:
    if find_nginx() is None:
        log("chaos bench needs nginx (make system-deps)")
        return 1
    t_start = time.monotonic()
    out: dict[str, Any] = {"params": {"kill_seconds": KILL_SECONDS, "kill_interval_s": 0.5,
                                      "redis_down_s": REDIS_DOWN, "workers_per_instance": WORKERS,
                                      "instances": 2, "clients": CLIENTS}}
    with tempfile.TemporaryDirectory(prefix="gx-bench-chaos-") as tmpd:
        tmp = Path(tmpd)
        for case in ("kills", "redis", "boot"):
            res: dict[str, dict[str, Any]] = {}
            for side in SIDES if case != "boot" else ("ext", "plain"):
                log(f"=== {case}: {SIDES[side][0]}")
                res[side] = run_side(side, case, tmp)
            {"kills": report_kills, "redis": report_redis, "boot": report_boot}[case](res)
            if case == "boot":
                r = res["ext"]
                path = plot(case, res, "Boot-failing app on one instance, fixed later",
                            [Marker(r["fault_at_s"], "app broken, workers killed"),
                             Marker(r["fixed_at_s"], "fixed")], [])
            elif case == "kills":
                k0, k1 = res["ext"]["kill_window_s"]
                path = plot(case, res, "Worker SIGKILL every 0.5 s under load",
                            [], [Span(k0, k1, label="kills")])
            else:
                r = res["ext"]
                path = plot(case, res, f"redis-server SIGKILLed for {REDIS_DOWN:.0f} s under load",
                            [Marker(r["redis_killed_at_s"], "redis killed"),
                             Marker(r["redis_answering_at_s"], "redis answers")], [])
            log(f"   plot: {path}")
            out[case] = {side: {k: v for k, v in r.items() if not k.startswith("_")}
                         for side, r in res.items()}
    out["machine"] = {"cpus_usable": len(os.sched_getaffinity(0)),
                      "python": platform.python_version(),
                      "nginx": subprocess.run([find_nginx() or "nginx", "-v"], capture_output=True,
                                              text=True).stderr.strip(),
                      "loadavg_at_end": list(os.getloadavg())}
    out["duration_s"] = round(time.monotonic() - t_start, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {RESULTS / 'chaos.json'} ({out['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
