"""Chaos through nginx: two instances of the example behind the rendered config, real
redis-server (appendonly), faults injected under load (short runs of bench/chaos.py's
cases; the long ones and the plain-Gunicorn baseline are in the benchmark).

Each fault must stay where it happens: a killed worker costs only its own requests in
flight and its slot comes back; a dead Redis costs only the routes that use it (503 with
Retry-After) and they answer again as soon as it does, with every session intact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from chaos_cases import boot_failure, redis_outage, worker_kills
from example_cluster import APPS, example_cluster
from harness import RedisServer

pytestmark = [pytest.mark.nginx, pytest.mark.redis, pytest.mark.slow]

WORKERS = 3


@pytest.fixture
def aof_redis(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """redis-server with appendonly on: its data survives a SIGKILL and restart."""
    return redis_server_factory(extra_args=["--appendonly", "yes"])


def test_worker_kills_cost_only_their_requests_and_every_slot_comes_back(
        tmp_path: Path, aof_redis: RedisServer) -> None:
    with example_cluster(tmp_path, workers=WORKERS, redis=aof_redis) as c:
        res = worker_kills(c, seconds=6.0, interval=0.5, clients=16, min_kills=10)
        errors = c.nginx_errors()
    assert res["kills"] >= 10, res["kills"]
    # Only requests in flight on a killed worker may fail; nginx never runs out of
    # backends (main's max_fails=2 failed ~70% here, almost all "no live upstreams").
    assert "no live upstreams" not in errors
    assert res["failed_pct"] <= 0.5, (res["failed"], res["requests"], res["failures_by_status"])
    # No operator action: every slot of both instances serves again.
    assert res["every_slot_serves"], res["serving_workers"]


def test_redis_outage_fails_only_the_store_routes_and_recovers(
        tmp_path: Path, aof_redis: RedisServer) -> None:
    with example_cluster(tmp_path, workers=2, redis=aof_redis) as c:
        res = redis_outage(c, down=3.0, before=1.5, after=2.5, clients=8)
        errors = c.nginx_errors()
    # Routes that don't use the store never notice (main's http_503 retries made nginx
    # eject every instance, and /healthz failed with 502).
    assert res["free_failed"] == 0, res["free_failures_by_status"]
    assert "no live upstreams" not in errors
    # Routes that do answer 503 with Retry-After, nothing else, while Redis is down.
    assert res["store_503_with_retry_after"] > 0
    assert res["store_other_failures"] == 0, res["store_other_failures_by_status"]
    # They answer 200 again once Redis does (target 1 s, measured by bench/chaos.py;
    # the bound here is generous for a loaded machine), and no session was lost.
    first = res["first_store_200_after_redis_up_s"]
    assert first is not None and first <= 3.0, first
    assert res["sessions"] == 8 and res["sessions_lost"] == 0


def test_a_boot_failing_instance_stops_forking_refuses_and_recovers_when_fixed(
        tmp_path: Path, aof_redis: RedisServer) -> None:
    # The example app behind a boot fault (tests/apps/boot_fault_app.py), with the
    # settings from the environment (tests/apps/life_conf.py) for a short cool-down.
    fault = tmp_path / "boot-fault"
    env = {"PYTHONPATH": str(APPS), "BOOT_FAULT": str(fault),
           "BREAKER_FAILURES": "3", "BREAKER_COOLDOWN": "2", "MIN_UPTIME": "1"}
    with example_cluster(tmp_path, kind="ext_env", workers=2, redis=aof_redis,
                         app="boot_fault_app:app", env=env) as c:
        res = boot_failure(c, fault, broken_for=6.0, settle=20.0, clients=8)
        errors = c.nginx_errors()
        log = c.instances[0].log_text()
    # The crash loop stops within the breaker's bounds: 3 unstable exits per slot, then
    # one half-open try per cool-down (2 s, then 4 s: at most one per slot in the last 3 s).
    assert res["breaker_opened"] >= 2, log[-3000:]
    assert res["boots_while_broken"] <= 2 * (3 + 2), res["boots_while_broken"]
    assert res["boots_last_half"] <= 2, res["boots_last_half"]
    # Meanwhile the broken instance refuses connections, so nginx sends everything to
    # the other one: only requests in flight on the killed workers may fail.
    assert "no live upstreams" not in errors
    assert res["failed_pct"] <= 0.5, (res["failed"], res["requests"], res["failures_by_status"])
    # Fixed, it comes back by itself: a half-open try boots and every slot serves again.
    assert res["every_slot_serves"], (res, log[-3000:])
    assert res["half_open_tries"] >= 1 and res["breaker_closed"] >= 1
