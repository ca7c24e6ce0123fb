"""A worker's end of the bus.

Each worker holds two sockets made by the hub just before the fork:

* the call channel carries everything the worker sends, and the replies to
  its requests. A thread waiting in :meth:`Bus.request` reads its own reply
  directly (no hand-off between threads on the hot path, which keeps the round
  trip near a raw socketpair's); with several threads waiting (gthread), one
  reads at a time and hands each reply to its owner;
* the push channel carries what others send to this worker: messages,
  broadcasts, requests and publications. The listener thread reads it and
  runs the handlers.

Under the asyncio workers (``-k asgi``, ``uvicorn_worker.UvicornWorker``) the
bus is bound to the worker's event loop (:meth:`Bus.bind_loop`): the loop takes
the reader role of the call channel for good (a reader callback, no thread),
:meth:`Bus.arequest` waits on a future, and ``async def`` handlers run on the
loop. :meth:`Bus.request` called on a running event loop raises
:class:`RuntimeError` instead of blocking it, and the one-way sends
(:meth:`Bus.send`, :meth:`Bus.publish`) called there never wait for the socket:
what it can't take now goes from the writer thread, in order. Under gevent (which Gunicorn's
gevent worker always monkey-patches) :meth:`Bus.start` re-makes the sockets and
locks as gevent's, so the listener and every wait are greenlets yielding to the hub.

Messages from one sender arrive in the order sent. A reply travels on the call
channel, so it may overtake a one-way message pushed to the worker earlier.

What the bus can't carry (over ``ipc_max_frame``, not a msgpack value) is
refused in the sender before anything is written. A worker whose bus closes
for any other reason exits gracefully and is replaced in its slot: it never
serves on without a bus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import queue
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from . import frames
from .errors import (
    BusClosed,
    HandlerError,
    IPCError,
    NoHandler,
    RequestTimeout,
    WorkerGone,
    error_from_code,
)
from .frames import ALL, PRIMARY, Err, Msg, Pub, Ready, Rep, Req, Sub, Unsub
from .message import ErrorCallback, Handler, Handlers, Message, Subscribers

_RECV_SIZE = 64 * 1024
#: One-way sends closer together than this (seconds) are batched...
_BURST_GAP = 100e-6
#: ...up to this many bytes...
_BURST_BYTES = 64 * 1024
#: ...and for at most this long (seconds) before the flusher writes them.
_FLUSH_DELAY = 0.5e-3  # below malloc's mmap threshold: a bigger recv buffer costs an mmap per call
#: Async handler runs kept for a loop not bound yet (see Bus._early); more are refused.
_MAX_EARLY = 10_000


class _Pending:
    __slots__ = ("event", "done", "value", "error", "future")

    def __init__(self) -> None:
        # Made only when a thread has to wait for another to read its reply.
        self.event: threading.Event | None = None
        self.done = False
        self.value: Any = None
        self.error: IPCError | None = None
        #: Set by arequest(): resolved on the bound loop when the reply is in.
        self.future: asyncio.Future[None] | None = None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


#: A write for the writer thread: its future, and what to call.
_Write = tuple["concurrent.futures.Future[None]", Callable[..., None], tuple[Any, ...]]


async def _finished(fut: concurrent.futures.Future[None]) -> None:
    """Wait for the writer thread's write ``fut``, shielded: a cancelled coroutine leaves
    the write to finish (and the write lock to be released), never half a frame sent."""
    await asyncio.shield(asyncio.wrap_future(fut))


def _forget_reader(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    try:
        loop.remove_reader(fd)
    except (OSError, ValueError):
        pass


def _green() -> bool:
    """True in a gevent-patched process (Gunicorn's gevent worker patches everything)."""
    import sys

    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


class Bus:
    """The worker's bus API: :data:`gunicorn_ext.worker`.

    Handlers may be registered at any time, even at import in the arbiter with
    ``preload_app`` (they are inherited by the fork). Sending needs a running
    gunicorn-ext worker, and raises :class:`BusClosed` anywhere else.
    """

    def __init__(self) -> None:
        self.slot = -1
        self.log: Any = None
        self._sock: socket.socket | None = None
        self._push: socket.socket | None = None
        self._closed_reason = (
            "not in a gunicorn-ext worker: is gunicorn_ext.enable(globals()) the last line "
            "of the Gunicorn config?"
        )
        self._handlers = Handlers("worker slot -1", allow_async=True)
        self._subscribers = Subscribers("worker slot -1", allow_async=True)
        self._subscribers.run_async = lambda result, topic: self._on_loop(
            self._subscribers.arun(result, topic), None)
        self._primary_names: frozenset[str] | None = None
        self.max_frame = frames.DEFAULT_MAX_FRAME
        #: Makes :meth:`close` happen once when several threads see the bus fail.
        self._close_lock = threading.Lock()
        self._wlock = threading.Lock()
        #: Held by the thread reading the call channel (the "reader role").
        self._rlock = threading.Lock()
        #: One-way frames held back during a burst (see :meth:`send`).
        self._obuf = bytearray()
        self._last_oneway = 0.0
        self._flusher_cv = threading.Condition(self._wlock)
        self._flusher: threading.Thread | None = None
        self._rcvtimeo = 0.0
        self._pending: dict[int, _Pending] = {}
        self._reader = frames.FrameReader()
        self._push_reader = frames.FrameReader()
        self._ids = itertools.count(1)
        self._listener: threading.Thread | None = None
        self._reported_ready = False
        #: The event loop that reads the call channel (asyncio workers), and its thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_tid = 0
        #: Async handler runs that arrived before a loop was bound (the uvicorn worker
        #: makes its loop in run(), after the bus started), started by bind_loop().
        self._early: list[Any] = []
        self._early_lock = threading.Lock()
        self._green = False
        #: What the writer thread is to write: async writes the socket could not take at once.
        self._writes: queue.SimpleQueue[_Write] | None = None
        #: Writes given to the writer thread and not done yet; both guarded by this lock.
        self._queued = 0
        self._writes_lock = threading.Lock()

    # ------------------------------------------------------------ registration

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: handle messages and requests called ``name`` sent to this
        worker (by the primary, by another worker, or as a broadcast).

        The handler runs in the listener thread and gets a :class:`Message`;
        its return value is the reply to a request. An ``async def`` handler
        runs on the worker's event loop (asyncio workers; see :meth:`bind_loop`)
        and its awaited value is the reply.
        """

        def register(fn: Handler) -> Handler:
            self._handlers.add(name, fn)
            return fn

        return register

    def subscribe(self, topic: str) -> Callable[[Callable[[Message], None]], Callable[[Message], None]]:
        """Decorator: receive every publication on ``topic`` from any process of the instance.

        An ``async def`` subscriber runs on the worker's event loop, like an async handler.
        """
        frames.check_address(topic, what="a topic")

        def register(fn: Callable[[Message], None]) -> Callable[[Message], None]:
            if self._subscribers.add(topic, fn) and self._sock is not None:
                self._write(Sub(topic))
            return fn

        return register

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; drops every handler registered for it."""
        frames.check_address(topic, what="a topic")
        if self._subscribers.remove(topic) and self._sock is not None:
            self._write(Unsub(topic))

    def on_error(self, fn: ErrorCallback) -> ErrorCallback:
        """Decorator: called as ``fn(name, error)`` when a one-way message this
        worker sent could not be handled (no handler, handler raised, worker gone)."""
        return self._handlers.on_error(fn)

    # ------------------------------------------------------------------ wiring

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def attach(self, sock: socket.socket, push: socket.socket, slot: int,
               primary_names: frozenset[str], log: Any, max_frame: int) -> None:
        """Take over this worker's end of the bus (``post_fork``, in the child)."""
        sock.setblocking(True)
        push.setblocking(True)
        self._sock = sock
        self._push = push
        self._reported_ready = False
        self.slot = slot
        self.log = self._handlers.log = self._subscribers.log = log
        self._handlers.where = self._subscribers.where = f"worker slot {slot}"
        self._primary_names = primary_names
        self.max_frame = max_frame
        self._reader = frames.FrameReader(max_frame)
        self._push_reader = frames.FrameReader(max_frame)
        for topic in self._subscribers.topics:  # subscriptions made before the fork (preload)
            self._write(Sub(topic))
        os.register_at_fork(after_in_child=self._after_fork_child)

    def start(self, ready: bool = True) -> None:
        """Start the listener (``post_worker_init``) and, unless ``ready`` is False, tell
        the primary this worker is ready (an ASGI worker's app says so later: see
        :meth:`report_ready`)."""
        if self._sock is None or self._listener is not None:
            return
        if _green():
            self._go_green()
        self._listener = threading.Thread(target=self._listen, name="gunicorn-ext-bus", daemon=True)
        self._listener.start()
        self._flusher = threading.Thread(target=self._flush_soon, name="gunicorn-ext-flush",
                                         daemon=True)
        self._flusher.start()
        if ready:
            self.report_ready()

    def report_ready(self) -> None:
        """Tell the primary this worker is ready to serve (what a rolling reload waits
        for before it stops the old worker of the slot); once, later calls do nothing."""
        if self._sock is None or self._reported_ready:
            return
        self._reported_ready = True
        self._write(Ready(os.getpid()))

    def _go_green(self) -> None:
        """Re-make sockets and locks after gevent's monkey-patching (``post_worker_init``).

        ``post_fork`` runs before the gevent worker patches, so the sockets and locks
        made then are the blocking OS ones: one recv or a contended lock would stop
        the whole hub. Made again now, they are gevent's, and every wait yields.
        """
        assert self._sock is not None and self._push is not None
        self._sock = socket.socket(fileno=self._sock.detach())
        self._push = socket.socket(fileno=self._push.detach())
        self._sock.settimeout(None)
        self._push.settimeout(None)
        self._close_lock = threading.Lock()
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._flusher_cv = threading.Condition(self._wlock)
        self._green = True

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Give the call channel to an event loop (asyncio workers; the hooks do it).

        Call it in the loop's thread (running or about to run). From then on the loop
        reads every reply (a reader callback: nothing blocks it), :meth:`arequest`
        waits on a future, ``async def`` handlers and subscribers run on it, and
        :meth:`request` from another thread waits for the loop to hand it its reply.
        Raises :class:`RuntimeError` when the bus is already bound to another loop.
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("the gunicorn-ext bus is already bound to another event loop")
        sock = self._sock
        if sock is None:
            raise BusClosed(self._closed_reason)
        if not self._rlock.acquire(False):
            # A thread is reading a reply right now: take over when it is done.
            loop.call_later(0.005, self.bind_loop, loop)
            return
        # The loop keeps the reader role for good: threads in request() wait on their event.
        self._loop_tid = threading.get_ident()
        with self._early_lock:
            self._loop = loop
            early, self._early = self._early, []
        loop.add_reader(sock.fileno(), self._on_call_readable, sock)
        for coro in early:
            loop.create_task(coro)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the bus is bound to (None outside asyncio workers)."""
        return self._loop

    def close(self, reason: str = "the bus was closed") -> bool:
        """Close this worker's end; every waiting request gets :class:`BusClosed`.

        Returns False when it was already closed.
        """
        with self._close_lock:
            sock, self._sock = self._sock, None
            push, self._push = self._push, None
            if sock is None:
                return False
            self._closed_reason = reason
        loop = self._loop
        if loop is not None:  # the loop stops watching the call channel
            try:
                if threading.get_ident() == self._loop_tid:
                    loop.remove_reader(sock.fileno())
                else:
                    loop.call_soon_threadsafe(_forget_reader, loop, sock.fileno())
            except (OSError, ValueError, RuntimeError):  # the loop is closed already
                pass
        for s in (sock, push):
            if s is None:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)  # also wakes the listener out of recv
            except OSError:
                pass
            s.close()
        self._fail_all(BusClosed(reason))
        return True

    def _lost(self, reason: str) -> None:
        """The bus failed under us: close it, and exit gracefully (once).

        A worker without a bus would serve on half-alive (no ``/cluster``, no
        metrics, no messages), so it stops the way Gunicorn's SIGTERM stops it:
        no new requests, in-flight ones finish; the arbiter then forks a new
        worker into the same slot, with a new bus.
        """
        if not self.close(reason):
            return
        self._log("error", "gunicorn-ext: worker slot %s (pid %s) lost its bus: %s; finishing "
                  "in-flight requests, then exiting so the slot gets a new worker",
                  self.slot, os.getpid(), reason)
        os.kill(os.getpid(), signal.SIGTERM)

    def _after_fork_child(self) -> None:
        # A process forked by the app (multiprocessing, ...) is not a worker:
        # close its copies without shutting down the worker's sockets.
        for s in (self._sock, self._push):
            if s is not None:
                s.close()
        self._sock = self._push = None
        self._closed_reason = "this process was forked from a worker; it has no bus"
        self._listener = None
        self._loop = None
        self._writes = None  # its thread stayed in the worker
        self._queued = 0
        self._writes_lock = threading.Lock()

    # --------------------------------------------------------------- sending

    def send(self, name: str, payload: Any = None, to: int = PRIMARY) -> None:
        """Send a one-way message to the primary (default), a slot, or ``ALL``.

        Raises :class:`NoHandler` at once when the primary has no handler for
        ``name``. A failure at a worker (no handler, handler raised, worker
        gone) comes back later to the :meth:`on_error` callbacks and the log.
        """
        self._check_target(name, to)
        self._write(Msg(next(self._ids), name, to, self.slot, payload), True)

    def broadcast(self, name: str, payload: Any = None) -> None:
        """Send a one-way message to every worker of the instance, this one included."""
        self.send(name, payload, ALL)

    def publish(self, topic: str, payload: Any = None) -> None:
        """Publish on ``topic`` to every subscriber of the instance.

        Like every send, raises :class:`MessageTooLarge` or
        :class:`UnencodableMessage` at once for what the bus can't carry.
        """
        frames.check_address(topic, what="a topic")
        self._write(Pub(topic, self.slot, payload), True)

    def request(self, name: str, payload: Any = None, to: int = PRIMARY, timeout: float = 5.0) -> Any:
        """Send a request to the primary (default) or a worker slot; return the reply.

        Raises :class:`NoHandler`, :class:`HandlerError`, :class:`WorkerGone`,
        :class:`RequestTimeout` or :class:`BusClosed`; :class:`MessageTooLarge`
        or :class:`UnencodableMessage` before anything is sent.

        On a running event loop it raises :class:`RuntimeError` (it would block
        the loop): use :meth:`arequest` there.
        """
        if asyncio._get_running_loop() is not None:
            raise RuntimeError(
                f"worker.request({name!r}) would block the running event loop; use "
                f"`await worker.arequest({name!r}, ...)` in async code")
        self._check_target(name, to)
        if to == ALL:
            raise ValueError("a request goes to one worker or to the primary, not ALL")
        rid = next(self._ids)
        pending = _Pending()
        self._pending[rid] = pending
        try:
            self._write(Req(rid, name, to, self.slot, payload))
            deadline = time.monotonic() + timeout
            rlock = self._rlock
            while not pending.done:
                if not rlock.acquire(False):
                    # Another thread is reading: it will hand us our reply, or
                    # wake us when it stops reading so we can take over.
                    event = pending.event
                    if event is None:
                        event = pending.event = threading.Event()
                    else:
                        event.clear()
                    if pending.done:
                        break
                    if not rlock.acquire(False):  # it may have stopped meanwhile
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise RequestTimeout(
                                f"request {name!r} to {_where(to)}: no reply within {timeout}s")
                        event.wait(remaining)
                        continue
                try:
                    self._read_until(pending, deadline)
                finally:
                    rlock.release()
                    if len(self._pending) > 1:
                        self._wake_waiters()
                if not pending.done and deadline <= time.monotonic():
                    raise RequestTimeout(
                        f"request {name!r} to {_where(to)}: no reply within {timeout}s")
        finally:
            self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        return pending.value

    async def arequest(self, name: str, payload: Any = None, to: int = PRIMARY,
                       timeout: float = 5.0) -> Any:
        """:meth:`request` for async code: same arguments, reply and errors.

        The first call binds the bus to the running loop when nothing bound it yet
        (see :meth:`bind_loop`); the wait is a future, so the loop serves on meanwhile.
        """
        self._check_target(name, to)
        if to == ALL:
            raise ValueError("a request goes to one worker or to the primary, not ALL")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self.bind_loop(loop)
            if self._loop is not loop:  # a thread holds the reader role for a moment
                await asyncio.sleep(0.01)
                if self._loop is not loop:
                    raise RuntimeError("the gunicorn-ext bus could not bind to this event loop")
        rid = next(self._ids)
        pending = _Pending()
        fut = pending.future = loop.create_future()
        self._pending[rid] = pending
        timer = loop.call_later(timeout, _wake, fut)
        try:
            await self._awrite(Req(rid, name, to, self.slot, payload))
            await fut
        finally:
            timer.cancel()
            self._pending.pop(rid, None)
        if not pending.done:
            raise RequestTimeout(f"request {name!r} to {_where(to)}: no reply within {timeout}s")
        if pending.error is not None:
            raise pending.error
        return pending.value

    async def asend(self, name: str, payload: Any = None, to: int = PRIMARY) -> None:
        """:meth:`send` for async code: the same arguments and errors.

        It never waits on the peer's handler; when the primary is slow to read, it
        waits (without blocking the loop) until the message is in the socket.
        """
        self._check_target(name, to)
        await self._awrite(Msg(next(self._ids), name, to, self.slot, payload), True)

    async def abroadcast(self, name: str, payload: Any = None) -> None:
        """:meth:`broadcast` for async code (see :meth:`asend`)."""
        await self.asend(name, payload, ALL)

    async def apublish(self, topic: str, payload: Any = None) -> None:
        """:meth:`publish` for async code (see :meth:`asend`)."""
        frames.check_address(topic, what="a topic")
        await self._awrite(Pub(topic, self.slot, payload), True)

    def _check_target(self, name: str, to: int) -> None:
        frames.check_address(name, to)
        if self._sock is None:
            raise BusClosed(self._closed_reason)
        if to == PRIMARY and self._primary_names is not None and name not in self._primary_names:
            raise NoHandler(f"the primary has no handler for {name!r}")
        if to < ALL:
            raise ValueError(f"bad destination {to}: use PRIMARY, ALL or a slot number >= 0")

    def _write(self, frame: frames.Frame, oneway: bool = False) -> None:
        """Send a frame; a one-way frame in a burst may be held back briefly.

        A one-way frame sent within ``_BURST_GAP`` of the previous one joins
        a buffer instead of costing a system call of its own. The buffer goes
        out with the next write that is not held back (so order is kept: a
        request flushes it first), when it reaches ``_BURST_BYTES``, at the end
        of the HTTP request (:meth:`flush`), or after ``_FLUSH_DELAY`` from the
        flusher thread. An isolated send is written at once.
        """
        if self._sock is None:
            raise BusClosed(self._closed_reason)
        # Outside the lock; what the bus can't carry is refused here, in the caller.
        data = frames.encode(frame, self.max_frame)
        if oneway and asyncio._get_running_loop() is not None:
            # a sync send in async code: never block the loop on a full socket
            self._write_or_hand_over(data, oneway)
            return
        self._write_bytes(data, oneway)

    def _write_bytes(self, data: bytes, oneway: bool = False) -> None:
        sock = self._sock
        if sock is None:
            raise BusClosed(self._closed_reason)
        with self._wlock:
            data = self._take(data, oneway)
            if data:
                self._sendall(sock, data)

    def _take(self, data: bytes, oneway: bool) -> bytes:
        """With the write lock: what to write now, held-back frames first (b"": held back)."""
        obuf = self._obuf
        if oneway:
            now = time.perf_counter()
            burst = now - self._last_oneway < _BURST_GAP
            self._last_oneway = now
            if burst and self._flusher is not None:
                if not obuf:
                    self._flusher_cv.notify()
                obuf += data
                if len(obuf) < _BURST_BYTES:
                    return b""
                data = b""
        if obuf:
            obuf += data
            data = bytes(obuf)
            obuf.clear()
        return data

    def _sendall(self, sock: socket.socket, data: bytes | memoryview) -> None:
        """With the write lock: write all of ``data``; a failure loses the bus (BusClosed)."""
        try:
            sock.sendall(data)
        except OSError as exc:
            self._lost(f"writing to the primary failed ({exc})")
            raise BusClosed(self._closed_reason) from None

    async def _awrite(self, frame: frames.Frame, oneway: bool = False) -> None:
        """:meth:`_write` for coroutines: the same refusals and errors, the same order
        with every other write, and the loop is never blocked on the socket."""
        if self._sock is None:  # before encoding: a closed bus says so, whatever the frame
            raise BusClosed(self._closed_reason)
        await self._awrite_bytes(frames.encode(frame, self.max_frame), oneway)

    async def _awrite_bytes(self, data: bytes, oneway: bool = False) -> None:
        """:meth:`_write_bytes` for coroutines (see :meth:`_awrite`)."""
        fut = self._write_or_hand_over(data, oneway)
        if fut is not None:
            await _finished(fut)

    def _write_or_hand_over(self, data: bytes,
                            oneway: bool) -> concurrent.futures.Future[None] | None:
        """Write what the socket takes now; None when that was all. When it is full (the
        primary is slow to read) or another thread is writing, the rest goes from the
        writer thread: its future, for the coroutine to wait on there, not in the loop.

        Under gevent (no event loop in the way) it is :meth:`_write_bytes`.
        """
        sock = self._sock
        if sock is None:
            raise BusClosed(self._closed_reason)
        if self._green:
            self._write_bytes(data, oneway)
            return None
        with self._writes_lock:
            # Behind writes the writer thread has still to do, or a thread writing now,
            # it queues (so a rest handed over below is never behind one that waits for it).
            if self._queued or not self._wlock.acquire(False):
                return self._to_writer(self._write_bytes, data, oneway)
            try:
                data = self._take(data, oneway)
                sent = 0
                while sent < len(data):
                    try:
                        sent += sock.send(data[sent:] if sent else data, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    except InterruptedError:
                        continue
                    except OSError as exc:
                        self._lost(f"writing to the primary failed ({exc})")
                        raise BusClosed(self._closed_reason) from None
                if sent < len(data):  # partly written: nobody may write before its rest,
                    # so the write lock goes with the rest to the writer thread
                    return self._to_writer(self._finish_locked, sock, memoryview(data)[sent:])
            except BaseException:
                self._wlock.release()
                raise
            self._wlock.release()
            return None

    def _finish_locked(self, sock: socket.socket, rest: memoryview) -> None:
        """In the writer thread: the rest of a frame whose write lock it was handed."""
        try:
            self._sendall(sock, rest)
        finally:
            self._wlock.release()

    def _to_writer(self, fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        """With ``_writes_lock``: have the writer thread run ``fn(*args)`` after what it has.

        One thread (made at the first such write), so what it is given goes out in the
        order given; a daemon, so a primary that never reads again can't hold up the
        worker's exit.
        """
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        writes = self._writes
        if writes is None:
            writes = self._writes = queue.SimpleQueue()
            threading.Thread(target=self._write_in_turn, args=(writes,),
                             name="gunicorn-ext-writer", daemon=True).start()
        self._queued += 1
        writes.put((fut, fn, args))
        return fut

    def _write_in_turn(self, writes: queue.SimpleQueue[_Write]) -> None:
        """The writer thread: each write in turn, for good."""
        while True:
            fut, fn, args = writes.get()
            wanted = fut.set_running_or_notify_cancel()
            error: BaseException | None = None
            try:
                fn(*args)  # even when nobody waits: it may hold the write lock to release
            except BaseException as exc:
                error = exc
            with self._writes_lock:
                self._queued -= 1
            if wanted:
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(None)
            del fut, fn, args, error

    @property
    def batched(self) -> bytearray:
        """The one-way frames held back for the next :meth:`flush`: one buffer for the
        bus's life, emptied in place (never replaced), so a per-request hook can keep it
        and call :meth:`flush` only while it holds any."""
        return self._obuf

    def flush(self) -> None:
        """Write one-way messages held back by a burst now (cheap when there are none)."""
        if not self._obuf or self._sock is None:
            return
        with self._wlock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        sock = self._sock
        if not self._obuf or sock is None:
            return
        data = bytes(self._obuf)
        self._obuf.clear()
        try:
            sock.sendall(data)
        except OSError as exc:
            self._lost(f"writing to the primary failed ({exc})")

    def _flush_soon(self) -> None:
        """The flusher thread: writes a held-back burst ``_FLUSH_DELAY`` after it began."""
        cv = self._flusher_cv
        while self._sock is not None:
            with cv:
                while not self._obuf and self._sock is not None:
                    cv.wait(1.0)
            time.sleep(_FLUSH_DELAY)
            with cv:
                self._flush_locked()

    # ---------------------------------------------------------------- reading

    def _read_until(self, pending: _Pending, deadline: float) -> None:
        """Read the call channel until ``pending`` has its reply or time is up."""
        sock = self._sock
        if sock is None:
            return
        reader = self._reader
        while not pending.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._green:  # gevent waits in its hub; a kernel timeout would not be seen
                sock.settimeout(remaining)
            # A kernel receive timeout instead of poll(): one syscall per read,
            # and a setsockopt only when the timeout changes.
            elif abs(remaining - self._rcvtimeo) > 0.05 * remaining + 0.001:
                self._set_rcvtimeo(sock, remaining)
            try:
                data = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError, TimeoutError):
                continue  # timed out (or a signal): the loop re-checks the deadline
            except OSError as exc:
                self._lost(f"reading from the primary failed ({exc})")
                return
            if not data:
                self._lost("the primary closed the connection")
                return
            for frame in reader.feed(data):
                if type(frame) is Rep or type(frame) is Err:
                    self._deliver(frame)  # type: ignore[arg-type]
                else:
                    self._log("warning", "gunicorn-ext: unexpected %s frame on the call channel",
                              type(frame).__name__)
            if reader.error is not None:
                self._lost(f"bad frame from the primary: {reader.error}")
                return

    def _deliver(self, frame: Rep | Err) -> None:
        pending = self._pending.get(frame.id)
        if pending is None:
            self._log("debug", "gunicorn-ext: late reply %s dropped", frame.id)
            return
        if isinstance(frame, Rep):
            pending.value = frame.payload
        else:
            pending.error = error_from_code(frame.code, frame.message)
        # No lock: a waiter publishes its event before re-checking ``done``,
        # and we set ``done`` before reading the event, so one of us sees the other.
        pending.done = True
        event = pending.event
        if event is not None:
            event.set()
        fut = pending.future
        if fut is not None:
            self._resolve(fut)

    def _resolve(self, fut: asyncio.Future[None]) -> None:
        """Wake an arequest() waiting on ``fut``, from any thread."""
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_tid:
            _wake(fut)
            return
        try:
            fut.get_loop().call_soon_threadsafe(_wake, fut)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _on_call_readable(self, sock: socket.socket) -> None:
        """The loop's reader callback for the call channel (see :meth:`bind_loop`)."""
        if self._sock is not sock:
            try:
                asyncio.get_running_loop().remove_reader(sock.fileno())
            except (OSError, ValueError, RuntimeError):
                pass
            return
        try:
            data = sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"reading from the primary failed ({exc})")
            return
        if not data:
            self._lost("the primary closed the connection")
            return
        reader = self._reader
        for frame in reader.feed(data):
            if type(frame) is Rep or type(frame) is Err:
                self._deliver(frame)  # type: ignore[arg-type]
            else:
                self._log("warning", "gunicorn-ext: unexpected %s frame on the call channel",
                          type(frame).__name__)
        if reader.error is not None:
            self._lost(f"bad frame from the primary: {reader.error}")

    def _set_rcvtimeo(self, sock: socket.socket, seconds: float) -> None:
        sec = int(seconds)
        usec = int((seconds - sec) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
        self._rcvtimeo = seconds

    def _wake_waiters(self) -> None:
        """The reader role is free: wake waiting requests so one takes it."""
        for p in list(self._pending.values()):
            if not p.done and p.event is not None:
                p.event.set()

    def _fail_all(self, error: IPCError) -> None:
        for p in list(self._pending.values()):
            if not p.done:
                p.error = error
                p.done = True
                if p.event is not None:
                    p.event.set()
                if p.future is not None:
                    self._resolve(p.future)

    # --------------------------------------------------------------- listener

    def _listen(self) -> None:
        push = self._push
        reader = self._push_reader
        while push is not None and self._push is push:
            try:
                data = push.recv(_RECV_SIZE)
            except InterruptedError:
                continue
            except OSError as exc:
                if self._push is push:
                    self._lost(f"reading from the primary failed ({exc})")
                break
            if not data:
                if self._push is push:
                    self._lost("the primary closed the connection")
                break
            for frame in reader.feed(data):
                try:
                    self._handle(frame)
                except BusClosed:
                    return
                except Exception:
                    self._log("exception", "gunicorn-ext: failed to handle a bus frame")
            if reader.error is not None:
                self._lost(f"bad frame from the primary: {reader.error}")
                break

    def _handle(self, frame: frames.Frame) -> None:
        kind = type(frame)
        if kind is Msg or kind is Req:
            assert isinstance(frame, (Msg, Req))
            handlers = self._handlers
            if handlers.async_names and frame.name in handlers.async_names:
                self._on_loop(self._run_async(frame), frame)
                return
            back = handlers.handle(frame, self.max_frame)
            if back is not None:
                self._write_bytes(back)
        elif kind is Pub:
            assert isinstance(frame, Pub)
            self._subscribers.deliver(frame.topic, frame.payload, frame.src)
        elif kind is Err:
            assert isinstance(frame, Err)
            if frame.id == 0 and frame.code == BusClosed.code:  # the primary's goodbye
                self._lost(f"the primary closed it: {frame.message}")
                return
            self._handlers.report(frame.name, error_from_code(frame.code, frame.message))

    def _on_loop(self, coro: Any, frame: Msg | Req | None) -> None:
        """Run an async handler's coroutine on the bound loop (from the listener thread)."""
        loop = self._loop
        if loop is None and len(self._early) < _MAX_EARLY:
            with self._early_lock:
                if self._loop is None:
                    self._early.append(coro)
                    return
            loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            text = ("an async handler needs the worker's event loop, and this worker has none "
                    "(or too many runs wait for it)")
            self._log("error", "gunicorn-ext: %s (%s)", text,
                      frame.name if frame is not None else "a subscriber")
            if frame is not None:
                err = HandlerError(f"handler {frame.name!r} in worker slot {self.slot}: {text}")
                self._write_bytes(self._handlers.error(frame, err, self.max_frame))
            return
        asyncio.run_coroutine_threadsafe(coro, loop)

    async def _run_async(self, frame: Msg | Req) -> None:
        """An async handler's run on the loop: the same outcomes as a sync handler's."""
        back = await self._handlers.ahandle(frame, self.max_frame)
        if back is not None:
            try:
                await self._awrite_bytes(back)
            except BusClosed:
                pass

    def _log(self, level: str, msg: str, *args: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(msg, *args)


def _where(to: int) -> str:
    return "the primary" if to == PRIMARY else f"slot {to}"


#: The process's bus. Import it as ``gunicorn_ext.worker``.
worker = Bus()

__all__ = ["Bus", "worker", "WorkerGone"]
