"""Backoff and breaker bookkeeping (pure, no processes)."""

from __future__ import annotations

import pytest

from gunicorn_ext.restart.backoff import SlotPolicy


def test_delays_grow_by_factor_up_to_the_cap() -> None:
    p = SlotPolicy(initial=1.0, factor=1.5, cap=4.0, breaker_failures=0)
    delays = []
    now = 0.0
    for _ in range(6):
        p.exited(now, uptime=0.5, crashed=True)
        delays.append(p.delay)
        assert p.may_spawn(now + p.delay)
        assert p.delay == 0 or not p.may_spawn(now)
        now += p.delay + 0.5
    assert delays == [0.0, 1.0, 1.5, 2.25, 3.375, 4.0]


def test_stable_uptime_resets_the_backoff() -> None:
    p = SlotPolicy(initial=0.1, factor=2, cap=10, stable_after=30, breaker_failures=0)
    for t in range(5):
        p.exited(float(t), uptime=0.1, crashed=True)
    assert p.delay == pytest.approx(0.8)
    p.exited(100.0, uptime=31.0, crashed=True)
    assert p.delay == 0.0  # a crash after a stable run respawns at once
    p.exited(100.5, uptime=0.1, crashed=True)
    assert p.delay == pytest.approx(0.1)


def test_planned_exit_respawns_at_once_and_keeps_the_count() -> None:
    p = SlotPolicy(initial=1.0)
    p.exited(0.0, uptime=0.1, crashed=True)
    p.exited(0.5, uptime=0.1, crashed=True)
    assert not p.may_spawn(1.0)
    p.exited(5.0, uptime=5.0, crashed=False)
    assert p.may_spawn(5.0)
    assert p.restarts == 3 and p.crashes == 2


def test_breaker_opens_after_k_crashes_in_the_window_only() -> None:
    p = SlotPolicy(initial=0.0001, breaker_failures=3, breaker_window=10)
    assert not p.exited(0.0, 0.1, True)
    assert not p.exited(20.0, 0.1, True)  # the first one left the window
    assert not p.exited(21.0, 0.1, True)
    assert p.exited(22.0, 0.1, True)
    assert p.breaker_open and not p.may_spawn(1000.0)
    assert not p.exited(23.0, 0.1, True)  # opens once
    p.reset()
    assert p.may_spawn(23.0) and not p.breaker_open
