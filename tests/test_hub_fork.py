"""The hub and a bus across a real fork, without Gunicorn: the edges Gunicorn's timing hides."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from harness import wait_for
from logs import RecordingLog

from gunicorn_ext.ipc import frames
from gunicorn_ext.ipc.bus import Bus
from gunicorn_ext.ipc.hub import Hub


class _Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _Worker:
    pid: Any = "[booting]"  # what Gunicorn's Worker holds until fork() returns in the arbiter


def _start_in_child(hub: Hub, bus: Bus, log: Any = None) -> Bus:
    """In the forked child: take over the worker's end of the bus and start it."""
    assert hub.child_end is not None
    call, push, slot = hub.child_end
    bus.attach(call, push, slot, hub.handler_names, log or _Log(), frames.DEFAULT_MAX_FRAME)
    bus.start()
    return bus


def test_ready_reports_the_workers_pid_before_the_arbiter_knows_it() -> None:
    hub = Hub()
    got: list[tuple[int, int]] = []
    seen = threading.Event()

    @hub.on_ready
    def ready(slot: int, pid: int) -> None:
        got.append((slot, pid))
        seen.set()

    hub.start(_Log())
    try:
        worker = _Worker()
        hub.prepare_fork(3, worker)
        pid = os.fork()
        if pid == 0:  # the worker: speak at once
            try:
                _start_in_child(hub, Bus())
                time.sleep(0.5)
            finally:
                os._exit(0)
        # The arbiter has not recorded the pid yet (Gunicorn does it after fork returns).
        assert seen.wait(10)
        assert got == [(3, pid)]
        assert worker.pid == "[booting]"
        assert hub.workers()[0]["pid"] == 0  # unknown, not a crash in the hub thread
        worker.pid = pid
        assert hub.workers() == [{"slot": 3, "pid": pid, "ready": True, "retired": False}]
        os.waitpid(pid, 0)
    finally:
        hub.stop()



def test_read_last_words_dispatches_what_an_exited_worker_wrote() -> None:
    """What a worker wrote just before it exited (why it exits) is dispatched when
    read_last_words returns, even while the hub's thread is busy: the arbiter calls it
    before it describes the exit, which it may see before the hub read a word."""
    hub = Hub()
    notes: list[Any] = []
    hub.handler("last")(lambda msg: notes.append(msg.payload))
    hub.start(_Log())
    try:
        worker = _Worker()
        hub.prepare_fork(0, worker)
        pid = os.fork()
        if pid == 0:  # the worker: its last words, then gone
            try:
                bus = _start_in_child(hub, Bus())
                time.sleep(0.2)  # the hub's thread is busy by now
                bus.send("last", "why")
                bus.flush()
            finally:
                os._exit(0)
        worker.pid = pid
        hub.reactor.call(lambda: time.sleep(1.5))  # busy, as on a loaded machine
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: child_exit's view
        hub.read_last_words([worker], timeout=10)
        assert notes == ["why"]
        os.waitpid(pid, 0)
    finally:
        hub.stop()


def test_both_ends_answer_and_report_failures_the_same_way() -> None:
    """The one request handling (ipc/message.py) on both sides of a real fork: the same
    error for the same failure whichever end's handler it was, a one-way failure back at
    its sender's on_error with the same log line, a handler's traceback in its own end's log."""
    hub = Hub()
    log = RecordingLog()
    notices: list[list[str]] = []
    ready = threading.Event()

    @hub.handler("boom")
    def boom(msg: Any) -> None:
        raise ValueError("kaput")

    hub.on_error(lambda name, error: notices.append([name, type(error).__name__, str(error)]))
    hub.on_ready(lambda slot, pid: ready.set())
    hub.start(log)
    try:
        worker = _Worker()
        hub.prepare_fork(0, worker)
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                bus = Bus()
                wlog = RecordingLog()
                asked: list[list[str]] = []
                wnotices: list[list[str]] = []

                @bus.handler("boom")
                def wboom(msg: Any) -> None:
                    raise ValueError("kaput")

                @bus.handler("report")
                def report(msg: Any) -> dict[str, Any]:
                    return {"asked": asked, "notices": wnotices,
                            "log": [line for line in wlog.lines if line[0] != "debug"]}

                bus.on_error(lambda name, error: wnotices.append(
                    [name, type(error).__name__, str(error)]))
                _start_in_child(hub, bus, wlog)
                try:
                    bus.request("boom", timeout=10)
                except Exception as exc:
                    asked.append(["boom", type(exc).__name__, str(exc)])
                bus.send("boom")  # fails at the primary: the notice comes back here
                time.sleep(30)  # the listener answers the primary meanwhile; killed before
            finally:
                os._exit(0)
        worker.pid = pid
        try:
            assert ready.wait(10)
            asked = []
            for name in ("boom", "nope"):
                try:
                    hub.request(0, name, timeout=10)
                except Exception as exc:
                    asked.append([name, type(exc).__name__, str(exc)])
            hub.send(0, "nope")
            wait_for(lambda: notices, 10, what="the primary's failure notice")
            child = wait_for(lambda: (lambda r: r if r["notices"] else None)(
                hub.request(0, "report", timeout=10)), 10, what="the worker's failure notice")
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    finally:
        hub.stop()
    primary_raised = "handler 'boom' in the primary raised ValueError: kaput"
    worker_raised = "handler 'boom' in worker slot 0 raised ValueError: kaput"
    # A request to a handler that raises, or to no handler: the same error either way.
    assert child["asked"] == [["boom", "HandlerError", primary_raised]]
    assert asked == [["boom", "HandlerError", worker_raised],
                     ["nope", "NoHandler", "worker slot 0 has no handler for 'nope'"]]
    # A one-way message that failed: back to the sender's on_error, one warning there.
    assert child["notices"] == [["boom", "HandlerError", primary_raised]]
    assert notices == [["nope", "NoHandler", "worker slot 0 has no handler for 'nope'"]]
    assert ["warning", f"gunicorn-ext: a message worker slot 0 sent was not handled: "
            f"{primary_raised}"] in child["log"]
    assert ("warning", "gunicorn-ext: a message the primary sent was not handled: worker slot 0 "
            "has no handler for 'nope'") in log.lines
    # A handler's failure is logged, with its traceback, by the end that ran it, once each.
    assert [lv for lv, text in log.lines if "handler 'boom'" in text] == ["exception"] * 2
    assert [lv for lv, text in child["log"] if "handler 'boom'" in text and "raised" in text
            and "sent was not handled" not in text] == ["exception"]
