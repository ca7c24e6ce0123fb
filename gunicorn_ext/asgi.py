"""gunicorn-ext under the asyncio workers: ``-k asgi`` and ``uvicorn_worker.UvicornWorker``.

Neither worker runs WSGI, and the uvicorn worker calls no request hook, so the hooks put
:class:`ClusterMiddleware` around the ASGI app instead (``post_worker_init``). It binds
the bus to the worker's event loop (:meth:`~gunicorn_ext.ipc.bus.Bus.bind_loop`), counts
each HTTP request into the slot's metrics (requests, latency, in flight), sends the
one-way messages a request batched, and checks the soft memory limit after it (at most
every :data:`~gunicorn_ext.reporter.RSS_CHECK_GAP`). A route cookie
(:class:`~gunicorn_ext.sticky.AsgiRouteCookie`) right inside it is folded into it: its
check runs as a plain call, so the request passes through one middleware coroutine.

:class:`LoopWatch` is the hung-worker stack dump of an event loop: a stuck loop runs no
signal handler (Gunicorn's ``worker_abort`` never fires), so a thread notices the loop
has stopped answering and logs its stack before the arbiter's ``timeout`` kills it.

It also watches for the worker's graceful stop on the loop and then runs the
:func:`gunicorn_ext.stopping.on_stop` callbacks: both servers wait up to
``graceful_timeout`` for every open connection before the app's lifespan shutdown, so an
app with clients that never end (Socket.IO: :class:`~gunicorn_ext.socketio.AsyncBusManager`
registers one) must close them itself, and this is the first moment it can know.

Gunicorn internals: the app lives in ``worker.asgi`` (``-k asgi``, set by its
``load_wsgi``) or ``worker.wsgi`` (the uvicorn worker, read when ``run()`` starts
the server); both are read only after ``post_worker_init``, which is the seam used.
The stop is read from ``worker.alive`` and, under uvicorn, its ``Server.should_exit``
(:func:`gunicorn_ext.stopping.stop_probe`, made at the app's first call: the lifespan
startup, once uvicorn has set its signal handlers).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections.abc import Callable, MutableMapping
from typing import Any

from .ipc.bus import Bus
from .ipc.errors import BusClosed
from .reporter import Reporter
from .sticky import ENVIRON_KEY, ASGIApp, AsgiRouteCookie, Receive, Scope, Send
from .stopping import stop_probe, watch

__all__ = ["ClusterMiddleware", "LoopWatch", "app_attribute"]

_perf_counter = time.perf_counter


def app_attribute(worker: Any) -> str | None:
    """The attribute holding this worker's ASGI app, or None for a WSGI worker."""
    from . import gunicorn_internals as gi

    if gi.app_of(worker, "asgi") is not None:  # gunicorn.workers.gasgi.ASGIWorker
        return "asgi"
    if type(worker).__module__.startswith("uvicorn"):  # uvicorn_worker.UvicornWorker
        return "wsgi"
    return None


class ClusterMiddleware:
    """ASGI middleware: the bus's loop binding and the slot's request metrics.

    The hooks wrap the app with it; an app never needs to. Lifespan and WebSocket
    scopes pass through (a WebSocket is not a request here, as it is exempt from
    request deadlines under WSGI), but they bind the loop too.

    ``ready`` (None: not this middleware's job) is called once the app's lifespan
    startup completed, which is when the worker can serve: a rolling reload waits for
    it before it stops the slot's old worker, so a deploy whose startup fails stops the
    rollout. An app that doesn't speak lifespan (its lifespan call ends, or raises,
    without a word) is ready then too, as the server goes on serving it, unless
    ``lifespan_required`` (lifespan "on", where ``-k asgi`` stops on either). A startup
    cancelled (``-k asgi`` gives up on it after 30 s) is never ready: a rollout to it
    stops at its ready timeout.
    """

    def __init__(self, app: ASGIApp, bus: Bus, reporter: Reporter | None,
                 stall: float = 0.0, log: Any = None, worker: Any = None,
                 ready: Callable[[], None] | None = None,
                 lifespan_required: bool = False) -> None:
        self.app = app
        self.bus = bus
        self.reporter = reporter
        #: Seconds without the loop running before :class:`LoopWatch` logs its stack (0: off).
        self.stall = stall
        self.log = log
        self.watch: LoopWatch | None = None
        self._seen_loop = False
        #: The route cookie folded in (its app is called directly), or None.
        self.cookie = app if isinstance(app, AsgiRouteCookie) else None
        self._inner = app.app if isinstance(app, AsgiRouteCookie) else app
        self._limit = bool(reporter is not None and reporter.settings.memory_soft_limit)
        #: The bus's batched one-way messages: flush() is called only when it holds any.
        self._obuf = bus.batched
        self._cell: Any = None  # the loop thread's request counts
        #: The Gunicorn worker whose stop runs the ``on_stop`` callbacks (None: never).
        self.worker = worker
        self._stop_task: asyncio.Task[None] | None = None
        self._ready = ready
        self._lifespan_required = lifespan_required
        #: The app the hooks install (:meth:`_make_app`); calling the instance calls it.
        self.asgi: ASGIApp = self._make_app()

    def _first_call(self) -> None:
        self._seen_loop = True
        loop = asyncio.get_running_loop()
        if self.reporter is not None:
            self._cell = self.reporter.stats.thread_cell()  # every call runs on this thread
        bus = self.bus
        if bus.loop is None and bus.connected:
            try:
                bus.bind_loop(loop)
            except (RuntimeError, BusClosed):
                pass
        if self.stall and self.log is not None:
            self.watch = LoopWatch(loop, self.stall, self.log, bus.slot)
            self.watch.start()
        if self.worker is not None:
            self._stop_task = loop.create_task(watch(stop_probe(self.worker), self.log))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)

    def _make_app(self) -> ASGIApp:
        """The installed app: a plain coroutine function with its state in its closure.

        The hooks install it rather than the instance: calling an instance looks up its
        ``__call__`` and each ``self.x`` is a read, and a hello world's request costs the
        worker about 310k instructions, of which this layer took 9k as a method. A
        client pinned here whose only cookie is ours (every request after its first,
        behind nginx) is recognised by the list's ``in`` on the scope's headers, without
        a call into the route cookie.
        """
        inner, bus, reporter, obuf = self._inner, self.bus, self.reporter, self._obuf
        cookie = self.cookie
        pinned = cookie.pinned_header if cookie is not None else None
        prepare = cookie.prepare if cookie is not None else None
        limit = self._limit
        cell: Any = None  # the loop thread's request counts, from the first call on

        async def cluster_app(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal cell
            if cell is None and not self._seen_loop:
                self._first_call()
                cell = self._cell
            if scope["type"] != "http" or cell is None:  # cell None: no reporter
                if scope["type"] == "lifespan" and self._ready is not None:
                    await self._lifespan(scope, receive, send)
                else:
                    await self.app(scope, receive, send)
                return
            if prepare is not None:
                if pinned in scope.get("headers", ()):
                    scope[ENVIRON_KEY] = cookie  # what prepare() marks
                else:
                    send = prepare(scope, send)
            t0 = _perf_counter()
            cell.started += 1
            try:
                await inner(scope, receive, send)
            finally:
                if obuf:  # one-way messages the request batched leave with it
                    bus.flush()
                now = _perf_counter()
                cell.finish(now - t0)
                if limit and now >= reporter.next_rss_check:  # type: ignore[union-attr]
                    reporter.after_request(now)  # type: ignore[union-attr]  # soft memory limit

        return cluster_app

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's lifespan, calling ``ready`` once its startup completed (see the
        class's docstring)."""
        ready, self._ready = self._ready, None
        assert ready is not None
        said = False

        async def send_startup(message: MutableMapping[str, Any]) -> None:
            nonlocal said
            await send(message)
            kind = message.get("type")
            if not said and kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
                said = True
                if kind == "lifespan.startup.complete":
                    _report(ready)

        try:
            await self.app(scope, receive, send_startup)
        except asyncio.CancelledError:
            raise  # the server gave up on the startup
        except BaseException:
            if not said and not self._lifespan_required:
                _report(ready)  # no lifespan here: the server serves the app anyway
            raise
        if not said and not self._lifespan_required:
            _report(ready)


def _report(ready: Callable[[], None]) -> None:
    try:
        ready()
    except (BusClosed, OSError):
        pass  # the primary is gone: nobody to tell


class LoopWatch:
    """Log the stack of an event loop that stopped answering (once per stall).

    The loop stamps a beat on a timer every ``interval`` (a timer costs the loop nothing
    between beats, where a callback sent from another thread wakes it); a daemon thread
    looks at the beat as often, and when the loop has not stamped one for ``stall``
    seconds, the loop thread's stack goes to the log with the stall's length
    (Gunicorn's ``timeout`` then ends the worker, as for any worker that stops its
    heartbeat). Made and started in the thread that runs the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stall: float, log: Any, slot: int,
                 interval: float = 0.5) -> None:
        self.loop = loop
        self.stall = stall
        self.log = log
        self.slot = slot
        self.interval = min(interval, stall / 2)
        self._tid = threading.get_ident()
        self._beat = time.monotonic()
        self._stop = threading.Event()

    def _tick(self) -> None:
        self._beat = time.monotonic()
        if not self._stop.is_set():
            self.loop.call_later(self.interval, self._tick)

    def start(self) -> None:
        """Start beating (on the loop's thread) and watching (a daemon thread)."""
        self._stop = threading.Event()
        self._beat = time.monotonic()
        self.loop.call_later(self.interval, self._tick)
        threading.Thread(target=self._run, name="gunicorn-ext-loopwatch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        reported = False
        while not self._stop.wait(self.interval):
            if self.loop.is_closed():
                return
            late = time.monotonic() - self._beat
            if late < self.stall:
                reported = False
                continue
            if reported:
                continue
            reported = True
            frame = sys._current_frames().get(self._tid)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(gone)"
            self.log.critical("gunicorn-ext: worker slot %s: its event loop has not run for "
                              "%.1fs (something blocks it); the loop's stack:\n%s",
                              self.slot, late, stack)
