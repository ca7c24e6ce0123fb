"""The hub's reactor (gunicorn_ext/ipc/reactor.py) on its own: fds, calls, timers, failures."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from harness import wait_for
from logs import RecordingLog

from gunicorn_ext.ipc.reactor import Reactor


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor("test-reactor", "test reactor")
    r.start(RecordingLog())
    yield r
    r.stop()


def test_calls_from_other_threads_run_in_the_thread_and_inline_from_it(reactor: Reactor) -> None:
    where: list[tuple[str, bool]] = []
    done = threading.Event()

    def outer() -> None:
        where.append(("outer", reactor.in_thread()))
        reactor.call(lambda: where.append(("inner", reactor.in_thread())))
        where.append(("after inner", reactor.in_thread()))  # inner ran already: inline
        done.set()

    assert not reactor.in_thread()
    reactor.call(outer)
    assert done.wait(10)
    assert where == [("outer", True), ("inner", True), ("after inner", True)]


def test_timers_run_in_time_order_and_every_repeats(reactor: Reactor) -> None:
    got: list[str] = []
    reactor.call_later(0.2, lambda: got.append("late"))
    reactor.call_later(0.0, lambda: got.append("soon"))
    ticks: list[int] = []
    reactor.every(0.01, lambda: ticks.append(1))
    wait_for(lambda: "late" in got and len(ticks) >= 3, 10, what="the timers")
    assert got == ["soon", "late"]


def test_a_failing_callback_is_logged_and_the_loop_goes_on(reactor: Reactor) -> None:
    r, w = os.pipe()
    seen: list[bytes] = []

    def on_readable() -> None:
        data = os.read(r, 100)
        seen.append(data)
        if data == b"x":
            raise RuntimeError("a broken watcher")

    try:
        reactor.watch(r, on_readable)
        reactor.call_later(0, lambda: 1 / 0)  # type: ignore[func-returns-value]
        os.write(w, b"x")
        wait_for(lambda: seen == [b"x"], 10, what="the watcher")
        os.write(w, b"y")
        wait_for(lambda: seen == [b"x", b"y"], 10, what="the watcher, again")
        log = reactor.log
        wait_for(lambda: log.at("exception") == ["gunicorn-ext: timer failed",
                                                 f"gunicorn-ext: watcher of fd {r} failed"]
                 or log.at("exception") == [f"gunicorn-ext: watcher of fd {r} failed",
                                            "gunicorn-ext: timer failed"], 10, what="two log lines")
        reactor.unwatch(r)
        done = threading.Event()
        reactor.call(done.set)  # queued after the unwatch
        assert done.wait(10)
        os.write(w, b"z")
        flushed = threading.Event()
        reactor.call_later(0.1, flushed.set)
        assert flushed.wait(10)
        assert seen == [b"x", b"y"]  # not watched any more
    finally:
        os.close(r)
        os.close(w)


def test_stop_runs_the_cleanup_after_the_thread_is_gone() -> None:
    r = Reactor("test-reactor", "test reactor")
    r.start(RecordingLog())
    alive: list[bool] = []
    thread = r._parking.thread
    assert thread is not None
    r.stop(cleanup=lambda: alive.append(thread.is_alive()))
    assert alive == [False] and not r.running
    r.stop()  # again: nothing to do
