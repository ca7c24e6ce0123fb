"""The supervisor, restart policy and rolling reload against a fake arbiter: no processes.

:class:`FakeArbiter` does what ``gunicorn/arbiter.py`` does with the methods the
supervisor wraps (``spawn_worker``, ``reap_workers``, ``manage_workers``), in the
same order (27.0.1; ``gunicorn25=True``: 25.0.0, which raises a boot error before it
forgets the worker), with fake pids above Linux's pid_max and a settable clock, so
each test is fast and deterministic. The real-Gunicorn tests (test_lifecycle.py,
test_hup.py, ...) check the same behaviour end to end.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from gunicorn import sock as gsock
from gunicorn.config import Config
from gunicorn.errors import HaltServer
from harness import free_port

from gunicorn_ext import gunicorn_internals as gi
from gunicorn_ext.ipc.message import Message
from gunicorn_ext.reporter import EXITING
from gunicorn_ext.restart.breaker import CLOSED, HALF_OPEN, OPEN
from gunicorn_ext.settings import Settings
from gunicorn_ext.supervisor import Supervisor
from gunicorn_ext.worker_record import WorkerTable

#: Linux's pid_max is at most 2**22: no real process has these pids.
FIRST_PID = 5_000_000


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def _add(self, msg: str, *args: object, **kwargs: object) -> None:
        self.lines.append(msg % args if args else msg)

    info = warning = error = critical = debug = exception = _add

    def text(self) -> str:
        return "\n".join(self.lines)


class FakeTmp:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeWorker:
    """What ``gunicorn.workers.base.Worker.__init__`` sets that the arbiter side reads."""

    def __init__(self, age: int) -> None:
        self.age = age
        self.pid: Any = "[booting]"
        self.aborted = False
        self.alive = True
        self.tmp = FakeTmp()


class FakeCfg:
    def __init__(self) -> None:
        self.graceful_timeout = 1
        self.pre_fork: Callable[[Any, Any], Any] = lambda server, worker: None
        self.child_exit: Callable[[Any, Any], None] = lambda server, worker: None
        self.nworkers_changed: Callable[[Any, int, int | None], None] = lambda s, n, o: None


class FakeArbiter:
    """Gunicorn's Arbiter, as far as the supervisor's wraps reach, without processes."""

    def __init__(self, workers: int, gunicorn25: bool = False) -> None:
        self.WORKERS: dict[int, FakeWorker] = {}
        self.LISTENERS: list[Any] = []
        self.cfg = FakeCfg()
        self.log = FakeLog()
        self.pid = 1
        self.timeout = 30.0
        self.pidfile = None
        self.app: Any = None
        self.reexec_pid = 0
        self.master_pid = 0
        self._num_workers = workers
        self.worker_age = 0
        self.gunicorn25 = gunicorn25
        self.next_pid = FIRST_PID
        #: Exited, not yet reaped workers: pid -> (exit code, signal).
        self.exits: dict[int, tuple[int | None, int | None]] = {}
        self.reaped: set[int] = set()
        #: Signals sent to workers, by anyone: (pid, signal).
        self.signals: list[tuple[int, int]] = []
        self.wakeups = 0
        self.nworkers_calls: list[tuple[int, int | None]] = []

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @num_workers.setter
    def num_workers(self, value: int) -> None:
        old, self._num_workers = self._num_workers, value
        self.nworkers_calls.append((value, old))
        self.cfg.nworkers_changed(self, value, old)

    def wakeup(self) -> None:
        self.wakeups += 1

    def setup(self, app: Any) -> None:  # pragma: no cover - not driven here (rolling HUP)
        self.app = app

    def spawn_worker(self) -> int:
        self.worker_age += 1
        worker = FakeWorker(self.worker_age)
        self.cfg.pre_fork(self, worker)
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        worker.pid = pid
        self.WORKERS[pid] = worker
        return pid

    def reap_workers(self) -> None:
        for pid, (code, _sig) in list(self.exits.items()):
            del self.exits[pid]
            self.reaped.add(pid)
            worker = None if self.gunicorn25 else self.WORKERS.pop(pid, None)
            if code == gi.WORKER_BOOT_ERROR:
                raise HaltServer("Worker failed to boot.", gi.WORKER_BOOT_ERROR)
            if code == gi.APP_LOAD_ERROR:
                raise HaltServer("App failed to load.", gi.APP_LOAD_ERROR)
            if self.gunicorn25:
                worker = self.WORKERS.pop(pid, None)
            if worker is None:
                continue
            worker.tmp.close()
            self.cfg.child_exit(self, worker)

    def manage_workers(self) -> None:
        if len(self.WORKERS) < self.num_workers:
            for _ in range(self.num_workers - len(self.WORKERS)):
                self.spawn_worker()  # the instance's: the supervisor's wrap
        workers = sorted(self.WORKERS.items(), key=lambda w: w[1].age)
        while len(workers) > self.num_workers:
            pid, _ = workers.pop(0)
            self.kill_worker(pid, signal.SIGTERM)

    def kill_worker(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))

    def kill_workers(self, sig: int) -> None:
        for pid in list(self.WORKERS):
            self.kill_worker(pid, sig)

    def stop(self, graceful: bool = True) -> None:
        self.LISTENERS = []

    def handle_hup(self) -> None:  # pragma: no cover - not driven here
        raise AssertionError("Gunicorn's HUP")

    # -- the test's side

    def tick(self) -> None:
        """One turn of Gunicorn's main loop (after a signal or a wakeup)."""
        self.reap_workers()
        self.manage_workers()

    def exit(self, pid: int, code: int | None = None, sig: int | None = None) -> None:
        assert pid in self.WORKERS
        self.exits[pid] = (code, sig)

    def peek_exit(self, pid: int) -> tuple[int | None, int | None] | None:
        return self.exits.get(pid)

    def is_reaped(self, pid: int) -> bool:
        return pid in self.reaped

    def pids_by_slot(self) -> dict[int, int]:
        return {cast(int, WorkerTable.of(w).slot): pid  # type: ignore[union-attr]
                for pid, w in self.WORKERS.items()}


class FakeHub:
    """The hub calls the supervisor uses, recorded (no thread, no sockets)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[Message], Any]] = {}
        self.ready_callbacks: list[Callable[[int, int], None]] = []
        self.timers: list[float] = []
        self.retired: list[Any] = []
        self.unretired: list[Any] = []
        self.max_frame = self.max_backlog = 0
        #: Messages still in the hub's sockets: read_last_words dispatches them.
        self.unread: list[Message] = []

    def handler(self, name: str) -> Callable[[Callable[[Message], Any]], Any]:
        def register(fn: Callable[[Message], Any]) -> Any:
            self.handlers[name] = fn
            return fn
        return register

    def on_ready(self, fn: Callable[[int, int], None]) -> None:
        self.ready_callbacks.append(fn)

    def every(self, interval: float, fn: Callable[[], None]) -> None:
        pass

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers.append(delay)

    def retire(self, workers: list[Any]) -> None:
        self.retired.extend(workers)

    def unretire(self, worker: Any) -> None:
        self.unretired.append(worker)

    def read_last_words(self, workers: list[Any], timeout: float = 1.0) -> None:
        for msg in self.unread:
            self.handlers[msg.name](msg)
        self.unread.clear()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Cluster:
    arb: FakeArbiter
    sup: Supervisor
    hub: FakeHub
    clock: Clock

    def ready(self, pid: int) -> None:
        """The worker reports ready over the bus."""
        slot = WorkerTable.of(self.arb.WORKERS[pid]).slot  # type: ignore[union-attr]
        for fn in self.hub.ready_callbacks:
            fn(slot, pid)

    def all_ready(self) -> None:
        for pid in list(self.arb.WORKERS):
            self.ready(pid)

    def crash(self, slot: int, code: int = 1) -> int:
        pid = self.arb.pids_by_slot()[slot]
        self.arb.exit(pid, code=code)
        self.arb.tick()
        return pid


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Cluster]]:
    def refuse(pid: int, sig: int) -> None:
        raise AssertionError(f"os.kill({pid}, {sig}) in a fake-arbiter test")

    monkeypatch.setattr(os, "kill", refuse)

    def make(workers: int = 2, gunicorn25: bool = False, **settings: Any) -> Cluster:
        hub = FakeHub()
        sup = Supervisor(cast(Any, hub))
        sup.configure(Settings(control_socket=False, **settings))
        clock = Clock()
        sup.clock = clock
        arb = FakeArbiter(workers, gunicorn25)
        arb.cfg.pre_fork = sup.assign_slot
        arb.cfg.child_exit = sup.worker_exited
        arb.cfg.nworkers_changed = (
            lambda server, new, old: sup.scale_down(server, new) if old and new < old else None)
        monkeypatch.setattr(sup, "_kill", arb.kill_worker)
        monkeypatch.setattr(gi, "peek_exit", arb.peek_exit)
        monkeypatch.setattr(gi, "_reaped", arb.is_reaped)
        sup.install(arb)
        arb.manage_workers()  # Arbiter.start -> manage_workers spawns them
        return Cluster(arb, sup, hub, clock)

    yield make


# -- records ---------------------------------------------------------------------------


def test_each_worker_gets_a_record_and_only_one_attribute(cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=3)
    assert sorted(c.arb.pids_by_slot()) == [0, 1, 2]
    bare = set(vars(FakeWorker(0)))
    for pid, w in c.arb.WORKERS.items():
        assert set(vars(w)) - bare == {gi.ATTRIBUTE}  # nothing else stamped on Gunicorn's object
        rec = c.sup.workers.get(pid)
        assert rec is not None and rec is WorkerTable.of(w)
        assert rec.pid == pid and rec.generation == 1
        assert rec.state == "booting"
    c.all_ready()
    assert {r.state for r in c.sup.workers.live()} == {"ready"}


def test_a_crash_drops_the_record_and_the_slot_gets_the_next_generation(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=2)
    c.all_ready()
    c.clock.now += 5
    old = c.sup.workers.get(c.arb.pids_by_slot()[1])
    assert old is not None
    c.crash(1, code=1)
    assert old.exited and old.exit_reason == "exit code 1"
    assert c.sup.workers.get(cast(int, old.pid)) is None and len(c.sup.workers) == 2
    new = c.sup.workers.get(c.arb.pids_by_slot()[1])
    assert new is not None and new is not old and new.generation == 2
    assert new.exit_status is None and new.stats == {}  # nothing carried over
    st = c.sup.status()
    row = next(r for r in st["workers"] if r["slot"] == 1)
    assert row["last_exit"] == "exit code 1" and row["restarts"] == 1


def test_the_exit_note_and_stats_of_a_worker_land_in_its_record(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=1)
    pid = c.arb.pids_by_slot()[0]
    note = {"pid": pid, "reason": "recycled: RSS 600 MiB", "planned": True}
    c.hub.handlers[EXITING](Message(EXITING, note, src=0))
    c.arb.exit(pid, code=0)
    c.arb.tick()
    assert c.sup.last_exit[0] == "recycled: RSS 600 MiB"
    assert c.sup.policy(0).crashes == 0  # planned: not a crash


def test_the_exit_note_still_unread_at_the_exit_is_read_before_the_exit_is_described(
        cluster: Callable[..., Cluster]) -> None:
    # A worker that says why and ends at once (a request deadline's os._exit) can be
    # reaped while its note still waits in the hub's socket.
    c = cluster(workers=1)
    pid = c.arb.pids_by_slot()[0]
    note = {"pid": pid, "reason": "recycled: request deadline: GET /hang", "planned": True}
    c.hub.unread.append(Message(EXITING, note, src=0))
    c.arb.exit(pid, code=0)
    c.arb.tick()
    assert c.sup.last_exit[0] == "recycled: request deadline: GET /hang"
    assert c.hub.unread == []


def test_a_reaped_workers_late_note_is_not_its_successors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    table = WorkerTable()
    forking = table.spawned(0, FakeWorker(1), 0.0)  # pid not known yet: fork() has not returned

    def kill(pid: int, sig: int) -> None:
        assert sig == 0
        if pid == 4_999_999:
            raise ProcessLookupError(pid)

    monkeypatch.setattr(os, "kill", kill)
    assert table.find(4_999_999, 0) is None  # gone: the slot's reaped worker spoke late
    assert table.find(5_000_000, 0) is forking  # alive: the new worker, speaking early
    assert table.find(5_000_000, 1) is None


# -- backoff -----------------------------------------------------------------------


def test_first_crash_respawns_at_once_then_backoff_holds_the_slot(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=2, restart_delay=0.5)
    c.crash(0)  # never ready: unstable; the first crash respawns at once
    assert 0 in c.arb.pids_by_slot()
    c.crash(0)  # the second in a row waits restart_delay
    assert 0 not in c.arb.pids_by_slot() and 1 in c.arb.pids_by_slot()
    assert 0.5 + 0.01 in c.hub.timers  # the arbiter is woken when the backoff ends
    c.clock.now += 0.4
    c.arb.tick()
    assert 0 not in c.arb.pids_by_slot()
    c.clock.now += 0.2
    c.arb.tick()
    assert 0 in c.arb.pids_by_slot()
    assert "crashed after" in c.arb.log.text() and "respawning in 0.50s" in c.arb.log.text()


def test_a_served_worker_killed_by_a_signal_does_not_grow_the_backoff(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=1, restart_delay=0.5)
    for _ in range(4):
        c.all_ready()
        c.clock.now += 5
        pid = c.arb.pids_by_slot()[0]
        c.arb.exit(pid, sig=signal.SIGKILL)
        c.arb.tick()
        assert 0 in c.arb.pids_by_slot()  # respawned at once every time
    assert c.sup.policy(0).delay == 0 and c.sup.breaker(0).state == CLOSED
    assert c.sup.last_exit[0] == "killed by SIGKILL"


# -- the breaker and the gate --------------------------------------------------------


def _tcp_listener() -> gsock.TCPSocket:
    return gsock.TCPSocket(("127.0.0.1", free_port()), Config(), FakeLog())


def test_breaker_opens_closes_the_listeners_then_a_probe_closes_it(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=1, restart_delay=0, restart_breaker_failures=3,
                restart_breaker_cooldown=10, restart_min_uptime=1)
    lnr = _tcp_listener()
    c.arb.LISTENERS = [lnr]
    try:
        for _ in range(3):
            c.crash(0)
        b = c.sup.breaker(0)
        assert b.state == OPEN and not c.arb.WORKERS
        assert c.sup.gate.closed  # nobody serves: refuse instead of queueing
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(lnr.sock.getsockname(), timeout=2).close()
        assert "restart breaker open: slot 0 crashed 3 times" in c.arb.log.text()
        c.clock.now += 9
        c.arb.tick()
        assert not c.arb.WORKERS
        c.clock.now += 2
        c.arb.tick()  # cool-down over: one probe, the listener listens again first
        assert b.state == HALF_OPEN and len(c.arb.WORKERS) == 1 and not c.sup.gate.closed
        socket.create_connection(lnr.sock.getsockname(), timeout=2).close()
        probe = c.arb.pids_by_slot()[0]
        assert b.probe_pid == probe
        c.ready(probe)
        c.clock.now += 0.5
        c.arb.tick()
        assert b.state == HALF_OPEN  # not up restart_min_uptime yet
        c.clock.now += 1
        c.arb.tick()
        assert b.state == CLOSED and "restart breaker closed" in c.arb.log.text()
    finally:
        lnr.close()


def test_a_failed_probe_opens_the_breaker_for_twice_the_cool_down(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=1, restart_delay=0, restart_breaker_failures=2,
                restart_breaker_cooldown=10)
    c.crash(0)
    c.crash(0)
    b = c.sup.breaker(0)
    assert b.state == OPEN
    c.clock.now += 11
    c.arb.tick()
    assert b.state == HALF_OPEN
    c.crash(0)  # the probe fails before it is ready
    assert b.state == OPEN and b.wait == 20 and b.retry_in(c.clock.now) == 20
    assert not c.arb.WORKERS


def test_breaker_action_exit_shuts_the_arbiter_down(cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=1, restart_delay=0, restart_breaker_failures=2,
                restart_breaker_action="exit")
    c.crash(0)
    c.arb.exit(c.arb.pids_by_slot()[0], code=1)
    c.arb.reap_workers()
    with pytest.raises(HaltServer, match="restart breaker open for slot 0"):
        c.arb.manage_workers()


# -- boot errors: the hand replay of reap_workers' tail --------------------------------


@pytest.mark.parametrize("gunicorn25", [False, True], ids=["gunicorn27", "gunicorn25"])
def test_a_boot_error_halts_only_when_asked(cluster: Callable[..., Cluster],
                                            gunicorn25: bool) -> None:
    c = cluster(workers=2, gunicorn25=gunicorn25, halt_on_boot_error=True)
    c.arb.exit(c.arb.pids_by_slot()[0], code=gi.WORKER_BOOT_ERROR)
    with pytest.raises(HaltServer):
        c.arb.reap_workers()

    c = cluster(workers=2, gunicorn25=gunicorn25, halt_on_boot_error=False)
    boot, other = c.arb.pids_by_slot()[0], c.arb.pids_by_slot()[1]
    worker = c.arb.WORKERS[boot]
    c.arb.exit(boot, code=gi.APP_LOAD_ERROR)
    c.arb.tick()
    assert boot not in c.arb.WORKERS and other in c.arb.WORKERS  # the live one stays
    assert worker.tmp.closed and WorkerTable.of(worker).exited  # type: ignore[union-attr]
    assert c.sup.last_exit[0] == "exit code 4 (app failed to load)"
    assert f"App failed to load. (pid {boot}); not shutting down (halt_on_boot_error=False)" \
        in c.arb.log.text()
    assert 0 in c.arb.pids_by_slot()  # and the slot was respawned (first crash: at once)


# -- rolling reload --------------------------------------------------------------------


def test_rolling_reload_replaces_each_slot_only_once_its_successor_is_ready(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=2)
    c.all_ready()
    old = c.arb.pids_by_slot()
    assert c.sup._dispatch("reload", {"batch": 1})["ok"]
    c.arb.tick()  # the queued action runs in the main loop; slot 0 gets a new worker
    assert len(c.arb.WORKERS) == 3
    new0 = next(p for p in c.arb.WORKERS if p not in old.values())
    assert WorkerTable.of(c.arb.WORKERS[new0]).slot == 0  # type: ignore[union-attr]
    for _ in range(3):
        c.arb.tick()
    assert c.arb.signals == []  # Gunicorn did not stop anyone for the extra worker
    assert c.arb.num_workers == 2 and c.arb.nworkers_calls == []  # nor was told of a change
    c.ready(new0)
    c.arb.tick()
    assert (old[0], signal.SIGTERM) in c.arb.signals and (old[1], signal.SIGTERM) not in c.arb.signals
    c.arb.exit(old[0], sig=signal.SIGTERM)
    c.arb.tick()
    new1 = next(p for p in c.arb.WORKERS if p not in (*old.values(), new0))
    c.ready(new1)
    c.arb.tick()
    c.arb.exit(old[1], sig=signal.SIGTERM)
    c.arb.tick()
    c.arb.tick()
    assert c.sup.rollout.state == "done" and c.sup.rollout.done == 2
    assert set(c.arb.pids_by_slot().values()) == {new0, new1}
    assert c.sup.policy(0).crashes == 0 and c.sup.policy(1).crashes == 0  # not crashes


def test_a_rollout_whose_new_worker_dies_keeps_the_old_one(cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=2)
    c.all_ready()
    old = c.arb.pids_by_slot()
    c.sup._dispatch("reload", {})
    c.arb.tick()
    new0 = next(p for p in c.arb.WORKERS if p not in old.values())
    c.arb.exit(new0, code=1)
    c.arb.tick()
    r = c.sup.rollout
    assert r.state == "failed" and "exit code 1" in r.message and "2 old worker(s) keep serving" \
        in r.message
    assert c.arb.pids_by_slot() == old and not c.arb.signals
    rec = c.sup.workers.get(old[0])
    assert rec is not None and not rec.retired and rec.worker in c.hub.unretired
    assert c.sup.policy(0).crashes == 0  # the failed new worker is not the slot's crash


def test_a_rollout_new_worker_that_never_reports_ready_times_out(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=1, reload_ready_timeout=5)
    c.all_ready()
    old = c.arb.pids_by_slot()[0]
    c.sup._dispatch("reload", {})
    c.arb.tick()
    new = next(p for p in c.arb.WORKERS if p != old)
    c.clock.now += 6
    c.arb.tick()
    assert c.sup.rollout.state == "failed" and "within 5s" in c.sup.rollout.message
    assert (new, signal.SIGTERM) in c.arb.signals and (old, signal.SIGTERM) not in c.arb.signals
    assert WorkerTable.of(c.arb.WORKERS[new]).planned  # type: ignore[union-attr]


# -- scaling ---------------------------------------------------------------------------


def test_scale_down_stops_the_highest_slots(cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=4)
    c.all_ready()
    by_slot = c.arb.pids_by_slot()
    c.sup._dispatch("scale", {"workers": 2})
    c.arb.tick()
    stopped = {pid for pid, sig in c.arb.signals if sig == signal.SIGTERM}
    assert stopped == {by_slot[2], by_slot[3]}  # not Gunicorn's oldest (slots 0 and 1)
    assert len(c.hub.retired) == 2
    for pid in stopped:
        c.arb.exit(pid, sig=signal.SIGTERM)
    c.arb.tick()
    assert sorted(c.arb.pids_by_slot()) == [0, 1] and not c.sup.policy(2).crashes
    c.sup._dispatch("scale", {"workers": 3})
    c.arb.tick()
    assert sorted(c.arb.pids_by_slot()) == [0, 1, 2]


def test_status_shows_a_slot_in_backoff(cluster: Callable[..., Cluster]) -> None:
    c = cluster(workers=2, restart_delay=2)
    c.all_ready()
    c.crash(1)
    c.crash(1)
    rows = {r["slot"]: r for r in c.sup.status()["workers"]}
    assert rows[0]["state"] == "ready" and rows[0]["pid"] == c.arb.pids_by_slot()[0]
    assert rows[1]["state"] == "backoff" and rows[1]["pid"] is None
    assert rows[1]["backoff"] == 2.0 and rows[1]["restarts"] == 2
