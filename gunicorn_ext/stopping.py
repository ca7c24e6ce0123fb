"""Callbacks run as soon as this worker starts a graceful stop.

Gunicorn stops a worker gracefully on TERM (shutdown, rolling reload, scale down,
gunicorn-ext's memory recycling and max lifetime) and after ``max_requests``: it stops
accepting, then waits up to ``graceful_timeout`` for every open connection. A client
that never ends its own connection (a Socket.IO long-poll or WebSocket) holds the
worker for all of that, so whoever holds such clients closes them on the stop
(:class:`~gunicorn_ext.socketio.BusManager` and
:class:`~gunicorn_ext.socketio.AsyncBusManager` register with :func:`on_stop`).

The stop is noticed by looking, every :data:`STOP_POLL`, at what Gunicorn itself reads:
``worker.alive`` (Gunicorn's worker classes clear it on TERM and at ``max_requests``)
and, under uvicorn-worker, whose TERM goes to uvicorn's own handler instead, its
server's ``should_exit`` (:func:`stop_probe`). Looking needs no
signal handler of ours and costs nothing per request. In a WSGI worker a daemon thread
looks (a greenlet under gevent), started by the first :func:`on_stop`; in an asyncio
worker a task on its loop (:class:`~gunicorn_ext.asgi.ClusterMiddleware` runs
:func:`watch`).
"""

from __future__ import annotations

import inspect
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["STOP_POLL", "on_stop"]

#: Seconds between two looks at whether the worker is stopping, and between two runs
#: of the callbacks once it is (so a client that connects meanwhile is closed too).
STOP_POLL = 0.1
#: The same while no callback is registered yet (on an asyncio worker's loop).
IDLE_POLL = 1.0

_callbacks: list[Callable[[], Any]] = []
_lock = threading.Lock()
#: The WSGI worker to watch (set by the hooks' post_worker_init), and the log.
_worker: Any = None
_log: Any = None
_thread_started = False


def on_stop(callback: Callable[[], Any]) -> None:
    """Call *callback* as soon as this worker starts a graceful stop, then again every
    :data:`STOP_POLL` until it exits; it must be quick and idempotent.

    A coroutine function is awaited on the worker's loop (``-k asgi``, uvicorn); a plain
    function is called on the loop there, and in a thread of its own (a greenlet under
    gevent) in a WSGI worker. An exception is logged, and the next run happens anyway.
    """
    with _lock:
        _callbacks.append(callback)
    _start_thread()


def watch_wsgi(worker: Any, log: Any) -> None:
    """Watch *worker* (a WSGI worker, after its patching: from ``post_worker_init``)."""
    global _worker, _log
    _worker, _log = worker, log
    _start_thread()


def _start_thread() -> None:
    global _thread_started
    with _lock:
        if _thread_started or _worker is None or not _callbacks:
            return
        _thread_started = True
    threading.Thread(target=_run_thread, args=(_worker,), name="gunicorn-ext-stop",
                     daemon=True).start()


def _run_thread(worker: Any) -> None:
    while worker.alive:
        time.sleep(STOP_POLL)
    while True:
        for callback in list(_callbacks):
            try:
                result = callback()
                if inspect.isawaitable(result):  # no loop in a WSGI worker
                    result.close()  # type: ignore[attr-defined]
            except Exception:
                if _log is not None:
                    _log.exception("gunicorn-ext: a stop callback failed")
        time.sleep(STOP_POLL)


def stop_probe(worker: Any) -> Callable[[], bool]:
    """Whether *worker* (an asyncio worker) is stopping, as a no-argument test.

    Make it on the loop once the server runs: uvicorn's SIGTERM handler, which is
    ``Server.handle_exit`` (uvicorn internals), is installed for the time it serves.
    """
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    if type(server).__module__.startswith("uvicorn") and hasattr(server, "should_exit"):
        uvicorn_server: Any = server
        return lambda: bool(uvicorn_server.should_exit) or not worker.alive
    return lambda: not worker.alive


async def watch(stopping: Callable[[], bool], log: Any) -> None:
    """On an asyncio worker's loop: wait for the stop, then run the callbacks until the
    worker exits (the server cancels this task then)."""
    import asyncio

    while not stopping():
        # Every STOP_POLL once there is something to run; until then, every IDLE_POLL.
        await asyncio.sleep(STOP_POLL if _callbacks else IDLE_POLL)
    while True:
        for callback in list(_callbacks):
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                if log is not None:
                    log.exception("gunicorn-ext: a stop callback failed")
        await asyncio.sleep(STOP_POLL)
