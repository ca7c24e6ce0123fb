"""The chaos cases on an :class:`~example_cluster.Cluster`: faults injected under load.

Shared by tests/test_chaos.py (short runs, asserting) and bench/chaos.py (the long
runs, printing each figure beside plain Gunicorn). Each case returns a summary dict of
plain numbers (JSON-ready) plus the raw results under ``"_results"``.

* :func:`worker_kills` -- SIGKILL a worker every *interval* seconds, alternating the
  two instances, under load; then wait until every slot of both instances serves.
* :func:`redis_outage` -- SIGKILL redis-server for *down* seconds under load on routes
  with and without the store, then start it again (appendonly: its data survives).
* :func:`boot_failure` -- make instance 0's app fail at boot (tests/apps/boot_fault_app.py)
  and kill its workers, under load; fix it after *broken_for* seconds and wait until
  every slot serves again, untouched.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from example_cluster import Cluster
from load import Load, Result, sessions_lost

__all__ = ["STORE_PATHS", "FREE_PATHS", "boot_failure", "redis_outage", "timeline", "worker_kills"]

#: Routes of the example that use the store (session, shared counter), and routes that don't.
STORE_PATHS = ("/counter", "/hits")
FREE_PATHS = ("/healthz", "/whoami")


def _status(r: Result) -> str:
    return str(r.status) if r.status else r.error


def timeline(results: Sequence[Result], end: float, step: float = 1.0) -> dict[str, list[float]]:
    """Answers per *step* seconds: ``t`` (bucket end), ``ok`` and ``failed`` per second."""
    n = max(1, int(end / step) + 1)
    ok, failed = [0] * n, [0] * n
    for r in results:
        i = min(n - 1, int(r.t / step))
        if r.ok:
            ok[i] += 1
        else:
            failed[i] += 1
    return {"t": [round((i + 1) * step, 3) for i in range(n)],
            "ok_per_s": [c / step for c in ok], "failed_per_s": [c / step for c in failed]}


def worker_kills(cluster: Cluster, *, seconds: float, interval: float = 0.5,
                 clients: int = 16, paths: Sequence[str] = ("/whoami",),
                 settle: float = 30.0, seed: int = 9, min_kills: int = 0) -> dict[str, Any]:
    """SIGKILL a random live worker every *interval* s for *seconds*, alternating the
    instances, under *clients* clients; then wait (up to *settle* s, no action taken)
    until every slot of both instances answers straight to its instance.

    With *min_kills*, the kills go on past *seconds* (up to twice as long) until that
    many landed: on a loaded machine a round can find no live worker to kill."""
    rng = random.Random(seed)
    load = Load(cluster.url, paths, clients=clients, max_seconds=seconds + 30)
    kills: list[tuple[float, int, int | None]] = []
    load.start()
    try:
        time.sleep(1.0)
        k0 = load.now()
        end = time.monotonic() + seconds
        hard_end = end + seconds
        i = 0

        def landed() -> int:
            return sum(1 for k in kills if k[2] is not None)

        while time.monotonic() < end or (landed() < min_kills and time.monotonic() < hard_end):
            kills.append((round(load.now(), 3), i % 2, cluster.kill_worker(i % 2, rng)))
            i += 1
            time.sleep(interval)
        k1 = load.now()
        time.sleep(2.0)  # the load goes on past the last kill
    finally:
        results = load.stop()
    started = time.monotonic()
    serving = [sorted(cluster.serving_pids(k, settle)) for k in range(2)]
    all_serve = all(len(s) == cluster.workers for s in serving)
    failed = [r for r in results if not r.ok]
    statuses = Counter(_status(r) for r in failed)
    return {
        "requests": len(results), "failed": len(failed),
        "failed_pct": round(100.0 * len(failed) / max(1, len(results)), 3),
        "failures_by_status": dict(statuses),
        "kills": sum(1 for k in kills if k[2] is not None), "kill_window_s": [k0, k1],
        "every_slot_serves": all_serve,
        "serving_workers": [len(s) for s in serving], "workers_per_instance": cluster.workers,
        "recovered_after_s": round(time.monotonic() - started, 2) if all_serve else None,
        "timeline": timeline(results, load.now()),
        "_results": results, "_kills": kills,
    }


def redis_outage(cluster: Cluster, *, down: float = 10.0, before: float = 3.0,
                 after: float = 5.0, clients: int = 16) -> dict[str, Any]:
    """SIGKILL redis-server under load for *down* s, then start it again (same port)."""
    redis = cluster.redis
    if redis is None:
        raise ValueError("redis_outage needs a cluster on redis-server")
    paths = [p for pair in zip(FREE_PATHS, STORE_PATHS, strict=True) for p in pair]
    load = Load(cluster.url, paths, clients=clients, max_seconds=before + down + after + 30)
    load.start()
    try:
        time.sleep(before)
        t_kill = load.now()
        redis.kill()
        time.sleep(down)
        t_restart = load.now()
        redis.start()  # returns once it answers PING
        t_up = load.now()
        time.sleep(after)
    finally:
        results = load.stop()
    free = [r for r in results if r.path in FREE_PATHS]
    store = [r for r in results if r.path in STORE_PATHS]
    free_failed = [r for r in free if not r.ok]
    store_out = [r for r in store if t_kill <= r.t <= t_up]
    with_retry = [r for r in store_out if r.status == 503 and r.retry_after]
    # Anything else on a store route (no answer, a 500, a 503 without Retry-After) is a
    # failure; a 200 can only be a request answered just as Redis died or came back.
    bad_store = [r for r in store if not r.ok and not (r.status == 503 and r.retry_after)]
    first_ok = next((r.t for r in store if r.ok and r.t >= t_restart), None)
    lost = sessions_lost(results)
    return {
        "requests": len(results),
        "free_requests": len(free), "free_failed": len(free_failed),
        "free_failures_by_status": dict(Counter(_status(r) for r in free_failed)),
        "store_requests_during_outage": len(store_out),
        "store_503_with_retry_after": len(with_retry),
        "store_other_failures": len(bad_store),
        "store_other_failures_by_status": dict(Counter(_status(r) for r in bad_store)),
        "redis_killed_at_s": round(t_kill, 3), "redis_answering_at_s": round(t_up, 3),
        "first_store_200_after_redis_up_s": (round(first_ok - t_up, 3)
                                             if first_ok is not None else None),
        "sessions": len({r.client for r in results if r.count is not None}),
        "sessions_lost": len(lost),
        "timeline": timeline(results, load.now(), 0.5),
        "_results": results,
    }


def boot_failure(cluster: Cluster, fault: Path, *, broken_for: float, settle: float,
                 clients: int = 16) -> dict[str, Any]:
    """Break instance 0's app (create *fault*) and SIGKILL its workers under load; after
    *broken_for* s fix it (delete *fault*) and wait up to *settle* s for every slot.

    ``boots_while_broken`` counts worker boots in instance 0 from the fault to the fix,
    ``boots_last_half`` those in the second half of it (a breaker that holds: none but
    its half-open tries).
    """
    g = cluster.instances[0]
    load = Load(cluster.url, ("/whoami",), clients=clients,
                max_seconds=broken_for + settle + 30)
    load.start()
    try:
        time.sleep(1.0)
        mark = len(g.log_text())
        fault.touch()
        t_fault = load.now()
        for pid in g.worker_pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(broken_for / 2)
        half = len(g.log_text())
        time.sleep(broken_for / 2)
        text = g.log_text()
        fault.unlink()
        t_fix = load.now()
        serving = cluster.serving_pids(0, settle)
        t_back = load.now()
        time.sleep(1.0)
    finally:
        results = load.stop()
    failed = [r for r in results if not r.ok]
    all_serve = len(serving) == cluster.workers
    after = g.log_text()[mark:]
    return {
        "requests": len(results), "failed": len(failed),
        "failed_pct": round(100.0 * len(failed) / max(1, len(results)), 3),
        "failures_by_status": dict(Counter(_status(r) for r in failed)),
        "boots_while_broken": text[mark:].count("Booting worker"),
        "boots_last_half": text[half:].count("Booting worker"),
        "breaker_opened": after.count("restart breaker open"),
        "half_open_tries": after.count("restart breaker half-open"),
        "breaker_closed": after.count("restart breaker closed"),
        "fault_at_s": round(t_fault, 3), "fixed_at_s": round(t_fix, 3),
        "every_slot_serves": all_serve, "serving_workers": len(serving),
        "recovered_after_fix_s": round(t_back - t_fix, 2) if all_serve else None,
        "timeline": timeline(results, load.now()),
        "_results": results,
    }
