"""Fork parking (gunicorn_ext/forksafe.py), shared by the hub's reactor, the bus bridge and
the admin endpoint: a real background thread and real os.fork() calls, without Gunicorn."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from harness import wait_for
from logs import RecordingLog

from gunicorn_ext import forksafe
from gunicorn_ext.forksafe import ForkParking


class Looper:
    """A background thread that counts its turns and parks when asked, like the reactor."""

    def __init__(self, after_parent: Callable[[], None] | None = None,
                 after_child: Callable[[], None] | None = None) -> None:
        self.turns = 0
        self.running = True
        self.stuck = threading.Event()  # set: the thread stops looking at the parking
        self.log = RecordingLog()
        self.parking = ForkParking("test loop", lambda: None, after_parent=after_parent,
                                   after_child=after_child)
        self.parking.start(self.log, self._run, "test-loop")
        assert self.parking.thread is not None
        self.thread = self.parking.thread

    def _run(self) -> None:
        while self.running:
            if self.stuck.is_set():
                time.sleep(0.01)
                continue
            if self.parking.requested:
                self.parking.park()
                continue
            self.turns += 1
            time.sleep(0.001)

    def stop(self) -> None:
        self.running = False
        self.parking.stop()  # joins the thread
        assert not self.thread.is_alive() and self.parking.thread is None


@pytest.fixture
def looper() -> Iterator[Callable[..., Looper]]:
    made: list[Looper] = []

    def make(**kw: Callable[[], None]) -> Looper:
        made.append(Looper(**kw))
        return made[-1]

    yield make
    for lp in made:
        lp.stop()


def fork_and_wait(child: Callable[[], bool] = lambda: True) -> int:
    """Fork; the child exits 0 when ``child()`` is true; returns its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if child() else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_the_thread_is_parked_while_the_parent_side_runs_and_resumes_after(
        looper: Callable[..., Looper]) -> None:
    seen: list[tuple[int, int]] = []
    lp: Looper

    def after_parent() -> None:
        before = lp.turns
        time.sleep(0.05)  # a running thread would count ~50 turns meanwhile
        seen.append((before, lp.turns))

    lp = looper(after_parent=after_parent)
    wait_for(lambda: lp.turns > 5, 10, what="the thread to run")
    assert fork_and_wait() == 0
    assert len(seen) == 1 and seen[0][0] == seen[0][1], seen  # parked throughout
    resumed_from = lp.turns
    wait_for(lambda: lp.turns > resumed_from + 5, 10, what="the thread to resume")
    assert not lp.parking.requested and lp.log.lines == []


def test_the_child_gets_fresh_parking_and_the_owners_child_handler(
        looper: Callable[..., Looper]) -> None:
    calls: list[str] = []
    lp = looper(after_child=lambda: calls.append("child"))
    wait_for(lambda: lp.turns > 0, 10, what="the thread to run")

    def in_child() -> bool:
        # No thread came along: nothing is parked, nothing is requested, a new fork
        # from the child does not wait for a thread that isn't there.
        ok = calls == ["child"] and not lp.parking.requested
        grandchild = os.fork()  # would wait and warn, were the parking still active
        if grandchild == 0:
            os._exit(0)
        os.waitpid(grandchild, 0)
        return ok and lp.log.lines == []

    assert fork_and_wait(in_child) == 0
    assert calls == []  # the parent's list: the handler ran in the child only


def test_a_thread_that_does_not_park_delays_the_fork_once_with_a_warning(
        looper: Callable[..., Looper], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forksafe, "PARK_TIMEOUT", 0.3)
    lp = looper()
    lp.stuck.set()
    t0 = time.monotonic()
    assert fork_and_wait() == 0
    assert time.monotonic() - t0 >= 0.3
    assert lp.log.lines == [("warning", "gunicorn-ext: test loop thread did not pause before fork")]
    # The request was withdrawn in the parent: once unstuck, the thread just runs.
    lp.stuck.clear()
    n = lp.turns
    wait_for(lambda: lp.turns > n + 5, 10, what="the thread to run on")


def test_after_stop_a_fork_neither_waits_nor_calls_the_parent_handler(
        looper: Callable[..., Looper], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forksafe, "PARK_TIMEOUT", 0.3)
    calls: list[str] = []
    lp = looper(after_parent=lambda: calls.append("parent"))
    lp.stop()
    lp.stuck.set()  # nothing would park now anyway
    assert fork_and_wait() == 0
    assert calls == [] and lp.log.lines == []  # no wait for a park: no warning


def test_stop_releases_a_parked_thread(looper: Callable[..., Looper]) -> None:
    lp = looper()
    wait_for(lambda: lp.turns > 0, 10, what="the thread to run")
    lp.parking.requested = True  # what the fork handler does, without the fork
    wait_for(lambda: lp.parking._parked, 10, what="the thread to park")
    lp.running = False
    lp.parking.stop()  # would wait 5 s for a thread still parked
    assert not lp.thread.is_alive()
