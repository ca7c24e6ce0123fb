"""Fork parking and the wake-up pipe (gunicorn_ext/forksafe.py), shared by the hub's reactor,
the bus bridge and the admin endpoint: a real background thread and real os.fork() calls,
without Gunicorn."""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from harness import wait_for
from logs import RecordingLog

from gunicorn_ext import forksafe
from gunicorn_ext.forksafe import ForkParking, WakePipe


class Looper:
    """A background thread that counts its turns and parks when asked, like the reactor."""

    def __init__(self, after_parent: Callable[[], None] | None = None,
                 after_child: Callable[[], None] | None = None) -> None:
        self.turns = 0
        self.running = True
        self.stuck = threading.Event()  # set: the thread stops looking at the parking
        self.log = RecordingLog()
        self.parking = ForkParking("test loop", after_parent=after_parent,
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


# ---------------------------------------------------------------- WakePipe


def readable(pipe: WakePipe) -> bool:
    return bool(select.select([pipe], [], [], 0)[0])


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_a_wake_makes_the_pipe_readable_until_drained() -> None:
    pipe = WakePipe()
    pipe.wake()  # not open yet: nothing happens
    assert pipe.fileno() == -1
    fd = pipe.open()
    assert fd >= 0 and pipe.open() == fd  # once
    try:
        assert not readable(pipe)
        pipe.wake()
        pipe.wake()
        assert readable(pipe)
        pipe.drain()
        assert not readable(pipe)
        pipe.drain()  # empty: nothing happens
    finally:
        pipe.close()


def test_wakes_beyond_what_the_pipe_holds_neither_block_nor_raise_and_one_drain_empties_it() -> None:
    pipe = WakePipe()
    pipe.open()
    try:
        for _ in range(100_000):  # a pipe holds 64 KiB: the rest are dropped
            pipe.wake()
        assert readable(pipe)
        pipe.drain()
        assert not readable(pipe)
    finally:
        pipe.close()


def test_close_twice_and_wake_or_drain_after_close_do_nothing() -> None:
    pipe = WakePipe()
    fd = pipe.open()
    pipe.close()
    assert pipe.fileno() == -1 and closed(fd)
    pipe.close()
    pipe.wake()
    pipe.drain()
    fd2 = pipe.open()  # opens again after close
    try:
        pipe.wake()
        assert readable(pipe)
    finally:
        pipe.close()
    assert closed(fd2)


def test_stop_closes_the_parkings_pipe(looper: Callable[..., Looper]) -> None:
    lp = looper()
    fd = lp.parking.pipe.fileno()
    assert fd >= 0 and not closed(fd)
    lp.stop()
    assert lp.parking.pipe.fileno() == -1 and closed(fd)


def test_in_the_child_the_pipe_is_closed_after_the_owners_handler_and_the_parents_still_works(
        looper: Callable[..., Looper]) -> None:
    seen: list[int] = []
    lp: Looper

    def after_child() -> None:
        seen.append(lp.parking.pipe.fileno())  # still open for the owner's handler

    lp = looper(after_child=after_child)
    fd = lp.parking.pipe.fileno()

    def in_child() -> bool:
        pipe = lp.parking.pipe
        pipe.wake()  # closed: nothing happens, nothing raises
        return seen == [fd] and pipe.fileno() == -1 and closed(fd)

    assert fork_and_wait(in_child) == 0
    assert lp.parking.pipe.fileno() == fd and not closed(fd)
    lp.parking.pipe.drain()  # the fork's own wake-up (the test loop does not read the pipe)
    lp.parking.pipe.wake()
    assert readable(lp.parking.pipe)
