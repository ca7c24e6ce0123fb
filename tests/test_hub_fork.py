"""The hub and a bus across a real fork, without Gunicorn: the edges Gunicorn's timing hides."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from gunicorn_ext.ipc import frames
from gunicorn_ext.ipc.bus import Bus
from gunicorn_ext.ipc.hub import Hub


class _Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _Worker:
    pid: Any = "[booting]"  # what Gunicorn's Worker holds until fork() returns in the arbiter


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
                assert hub.child_end is not None
                call, push, slot = hub.child_end
                bus = Bus()
                bus.attach(call, push, slot, hub.handler_names, _Log(), frames.DEFAULT_MAX_FRAME)
                bus.start()
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
