"""Backoff and breaker bookkeeping (pure, no processes), and the listener gate on real sockets."""

from __future__ import annotations

import os
import select
import signal
import socket
from pathlib import Path

import pytest
from gunicorn import sock as gsock
from gunicorn.config import Config
from harness import free_port
from prometheus_client.parser import text_string_to_metric_families

from gunicorn_ext.ipc.hub import Hub
from gunicorn_ext.metrics import ClusterMetrics
from gunicorn_ext.restart.backoff import SlotPolicy
from gunicorn_ext.restart.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from gunicorn_ext.restart.gate import Gate
from gunicorn_ext.settings import Settings, SettingsError
from gunicorn_ext.supervisor import Supervisor


def test_delays_grow_by_factor_up_to_the_cap() -> None:
    p = SlotPolicy(initial=1.0, factor=1.5, cap=4.0)
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
    p = SlotPolicy(initial=0.1, factor=2, cap=10, stable_after=30)
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


def test_kills_of_served_workers_keep_the_delay_without_growing_it() -> None:
    p = SlotPolicy(initial=1.0, factor=2, cap=10)
    for t in range(3):
        p.exited(float(t), uptime=0.1, crashed=True)
    assert p.delay == 2.0
    for t in range(3, 30):  # a storm of kills of workers that had served
        p.exited(float(t), uptime=0.5, crashed=True, unstable=False)
        assert p.delay == 2.0 and not p.may_spawn(t + 1.9) and p.may_spawn(t + 2.0)
    p.exited(100.0, uptime=31.0, crashed=True, unstable=False)
    assert p.delay == 0.0  # a stable run still resets it
    fresh = SlotPolicy()
    for t in range(100):
        fresh.exited(float(t), uptime=2.0, crashed=True, unstable=False)
    assert fresh.delay == 0.0 and fresh.may_spawn(99.0) and fresh.crashes == 100


# -- the breaker ----------------------------------------------------------------------


def test_breaker_opens_after_k_unstable_exits_in_the_window_only() -> None:
    b = Breaker(failures=3, window=10, cooldown=5)
    assert not b.record(0.0)
    assert not b.record(20.0)  # the first one left the window
    assert not b.record(21.0)
    assert b.record(22.0)
    assert b.state == OPEN and not b.may_spawn(22.0)
    assert not b.record(23.0)  # opens once
    assert b.retry_in(23.0) == pytest.approx(4.0)
    assert not b.due(26.9) and b.due(27.0)


def test_half_open_lets_one_worker_through_and_closes_when_it_stays_up() -> None:
    b = Breaker(failures=1, cooldown=5)
    assert b.record(0.0)
    b.half_open()
    assert b.state == HALF_OPEN and b.may_spawn(5.0)
    b.probe_pid = 42
    assert not b.may_spawn(5.0)  # one worker at a time
    b.close()
    assert b.state == CLOSED and b.may_spawn(6.0) and b.wait == 0.0
    assert b.record(7.0) and b.wait == 5.0  # the next trip starts from the base cool-down again


def test_a_failed_probe_doubles_the_cool_down_up_to_the_cap() -> None:
    b = Breaker(failures=1, cooldown=2, max_cooldown=10)
    b.record(0.0)
    waits = []
    now = 0.0
    for _ in range(5):
        now = b.retry_at
        assert b.due(now)
        b.half_open()
        b.probe_pid = 1
        waits.append(b.probe_failed(now + 0.5))
        assert b.state == OPEN and b.probe_pid is None and not b.may_spawn(now + 0.5)
    assert waits == [4.0, 8.0, 10.0, 10.0, 10.0]
    assert b.trips == 6


def test_breaker_off_never_opens() -> None:
    b = Breaker(failures=0)
    assert not any(b.record(float(t)) for t in range(100))
    assert b.state == CLOSED


@pytest.mark.parametrize(("code", "sig", "ready_at", "now", "counted"), [
    (3, None, None, 1.0, True),           # failed to boot
    (4, None, None, 1.0, True),           # app failed to load
    (None, signal.SIGKILL, None, 1.0, True),   # killed while booting: never served
    (1, None, None, 1.0, True),           # exited before it reported ready
    (1, None, 10.0, 10.5, True),          # exited within restart_min_uptime of ready
    (1, None, 10.0, 12.0, False),         # exited after a stable run
    (None, signal.SIGKILL, 10.0, 10.1, False),  # served, then was SIGKILLed
    (None, signal.SIGSEGV, 10.0, 30.0, False),  # served, then was killed by a signal
])
def test_only_unstable_exits_count(code: int | None, sig: int | None, ready_at: float | None,
                                   now: float, counted: bool) -> None:
    sup = Supervisor(Hub())
    sup.configure(Settings(restart_min_uptime=1.0))
    assert sup.unstable(code, sig, ready_at, now) is counted


def test_instance_scope_shares_one_breaker() -> None:
    sup = Supervisor(Hub())
    sup.configure(Settings(restart_breaker_scope="instance"))
    assert sup.breaker(0) is sup.breaker(3)
    sup.configure(Settings(restart_breaker_scope="slot"))
    assert sup.breaker(0) is not sup.breaker(3)


def test_breaker_settings_are_validated() -> None:
    assert Settings().restart_min_uptime == 1.0
    with pytest.raises(SettingsError, match="restart_breaker_cooldown must be positive"):
        Settings(restart_breaker_cooldown=0)
    with pytest.raises(SettingsError, match="restart_breaker_max_cooldown must be at least"):
        Settings(restart_breaker_cooldown=60, restart_breaker_max_cooldown=30)
    with pytest.raises(SettingsError, match="restart_min_uptime must not be negative"):
        Settings(restart_min_uptime=-1)


def test_metrics_show_open_and_half_open() -> None:
    cm = ClusterMetrics()
    cm.set_restart_state(0, 0.0, True)
    cm.set_restart_state(1, 0.0, False, half_open=True)
    cm.set_restart_state(2, 0.0, False)
    got = {s.labels["slot"]: s.value for fam in text_string_to_metric_families(cm.render().decode())
           if fam.name == "gunicorn_ext_worker_breaker_open" for s in fam.samples}
    assert got == {"0": 1.0, "1": 0.5, "2": 0.0}


# -- the gate: listeners stop while no worker runs ---------------------------------------


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def _add(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args)

    info = warning = error = debug = _add


def _tcp(cfg: Config, log: _Log) -> gsock.TCPSocket:
    return gsock.TCPSocket(("127.0.0.1", free_port()), cfg, log)


def test_gate_refuses_tcp_then_listens_again_on_the_same_socket() -> None:
    cfg, log = Config(), _Log()
    lnr = _tcp(cfg, log)
    addr, fd = lnr.sock.getsockname(), lnr.sock.fileno()
    queued = socket.create_connection(addr, timeout=5)  # in the backlog, never accepted
    gate = Gate()
    gate.close([lnr], log, "restart breaker open")
    assert gate.closed and "not listening on http://127.0.0.1" in log.lines[-1]
    with pytest.raises(ConnectionResetError):
        queued.recv(1)  # a queued client is told at once, not left waiting
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=5)
    assert gate.open([lnr], log) and not gate.closed
    assert (lnr.sock.getsockname(), lnr.sock.fileno()) == (addr, fd)  # what workers inherit
    with socket.create_connection(addr, timeout=5):
        select.select([lnr.sock], [], [], 5)
        conn, _ = lnr.sock.accept()
        conn.close()
    lnr.close()


def test_gate_renames_a_unix_socket_aside_and_back(tmp_path: Path) -> None:
    cfg, log = Config(), _Log()
    path = str(tmp_path / "app.sock")
    lnr = gsock.UnixSocket(path, cfg, log)
    gate = Gate()
    gate.close([lnr], log, "restart backoff")
    with pytest.raises(FileNotFoundError), socket.socket(socket.AF_UNIX) as c:
        c.connect(path)
    assert gate.open([lnr], log)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(path)
    gate.close([lnr], log, "restart backoff")
    gate.release(log)  # the arbiter stops: the path is back for Gunicorn to unlink
    assert os.path.exists(path) and not gate.closed
    gsock.close_sockets([lnr])
    assert not os.path.exists(path)


def test_gate_leaves_a_port_0_listener_alone() -> None:
    cfg, log = Config(), _Log()
    lnr = gsock.TCPSocket(("127.0.0.1", 0), cfg, log)
    gate = Gate()
    gate.close([lnr], log, "restart breaker open")
    assert any("stays open while no worker runs (bound to port 0)" in line for line in log.lines)
    with socket.create_connection(lnr.sock.getsockname(), timeout=5):
        pass
    lnr.close()
