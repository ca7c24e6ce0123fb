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

Messages from one sender arrive in the order sent. A reply travels on the call
channel, so it may overtake a one-way message pushed to the worker earlier.

What the bus can't carry (over ``ipc_max_frame``, not a msgpack value) is
refused in the sender before anything is written. A worker whose bus closes
for any other reason exits gracefully and is replaced in its slot: it never
serves on without a bus.
"""

from __future__ import annotations

import itertools
import os
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
    IPCError,
    NoHandler,
    RequestTimeout,
    WorkerGone,
    error_from_code,
)
from .frames import ALL, PRIMARY, Err, Msg, Pub, Ready, Rep, Req, Sub, Unsub
from .message import ErrorCallback, Handler, Message, answer, run_handler

_RECV_SIZE = 64 * 1024
#: One-way sends closer together than this (seconds) are batched...
_BURST_GAP = 100e-6
#: ...up to this many bytes...
_BURST_BYTES = 64 * 1024
#: ...and for at most this long (seconds) before the flusher writes them.
_FLUSH_DELAY = 0.5e-3  # below malloc's mmap threshold: a bigger recv buffer costs an mmap per call


class _Pending:
    __slots__ = ("event", "done", "value", "error")

    def __init__(self) -> None:
        # Made only when a thread has to wait for another to read its reply.
        self.event: threading.Event | None = None
        self.done = False
        self.value: Any = None
        self.error: IPCError | None = None


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
        self._handlers: dict[str, Handler] = {}
        self._topics: dict[str, list[Callable[[Message], None]]] = {}
        self._error_callbacks: list[ErrorCallback] = []
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

    # ------------------------------------------------------------ registration

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: handle messages and requests called ``name`` sent to this
        worker (by the primary, by another worker, or as a broadcast).

        The handler runs in the listener thread and gets a :class:`Message`;
        its return value is the reply to a request.
        """

        def register(fn: Handler) -> Handler:
            self._handlers[name] = fn
            return fn

        return register

    def subscribe(self, topic: str) -> Callable[[Callable[[Message], None]], Callable[[Message], None]]:
        """Decorator: receive every publication on ``topic`` from any process of the instance."""
        frames.check_address(topic, what="a topic")

        def register(fn: Callable[[Message], None]) -> Callable[[Message], None]:
            first = topic not in self._topics
            self._topics.setdefault(topic, []).append(fn)
            if first and self._sock is not None:
                self._write(Sub(topic))
            return fn

        return register

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; drops every handler registered for it."""
        frames.check_address(topic, what="a topic")
        if self._topics.pop(topic, None) is not None and self._sock is not None:
            self._write(Unsub(topic))

    def on_error(self, fn: ErrorCallback) -> ErrorCallback:
        """Decorator: called as ``fn(name, error)`` when a one-way message this
        worker sent could not be handled (no handler, handler raised, worker gone)."""
        self._error_callbacks.append(fn)
        return fn

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
        self.slot = slot
        self.log = log
        self._primary_names = primary_names
        self.max_frame = max_frame
        self._reader = frames.FrameReader(max_frame)
        self._push_reader = frames.FrameReader(max_frame)
        for topic in self._topics:  # subscriptions made before the fork (preload)
            self._write(Sub(topic))
        os.register_at_fork(after_in_child=self._after_fork_child)

    def start(self) -> None:
        """Start the listener and tell the primary we are ready (``post_worker_init``)."""
        if self._sock is None or self._listener is not None:
            return
        self._listener = threading.Thread(target=self._listen, name="gunicorn-ext-bus", daemon=True)
        self._listener.start()
        self._flusher = threading.Thread(target=self._flush_soon, name="gunicorn-ext-flush",
                                         daemon=True)
        self._flusher.start()
        self._write(Ready(os.getpid()))

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
        """
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
        self._write_bytes(frames.encode(frame, self.max_frame), oneway)

    def _write_bytes(self, data: bytes, oneway: bool = False) -> None:
        sock = self._sock
        if sock is None:
            raise BusClosed(self._closed_reason)
        with self._wlock:
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
                        return
                    data = b""
            if obuf:
                obuf += data
                data = bytes(obuf)
                obuf.clear()
            try:
                sock.sendall(data)
            except OSError as exc:
                self._lost(f"writing to the primary failed ({exc})")
                raise BusClosed(self._closed_reason) from None

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
            # A kernel receive timeout instead of poll(): one syscall per read,
            # and a setsockopt only when the timeout changes.
            if abs(remaining - self._rcvtimeo) > 0.05 * remaining + 0.001:
                self._set_rcvtimeo(sock, remaining)
            try:
                data = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
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
        if kind is Msg:
            assert isinstance(frame, Msg)
            try:
                self._call(frame.name, frame.payload, frame.src)
            except IPCError as exc:
                self._write(Err(frame.id, exc.code, str(exc), frame.src, True, frame.name))
        elif kind is Req:
            assert isinstance(frame, Req)
            self._write_bytes(answer(self._handlers, frame, f"worker slot {self.slot}", self.log,
                                     self.max_frame))
        elif kind is Pub:
            assert isinstance(frame, Pub)
            for fn in list(self._topics.get(frame.topic, ())):
                try:
                    fn(Message(frame.topic, frame.payload, frame.src))
                except Exception:
                    self._log("exception", "gunicorn-ext: subscriber of %r raised", frame.topic)
        elif kind is Err:
            assert isinstance(frame, Err)
            if frame.id == 0 and frame.code == BusClosed.code:  # the primary's goodbye
                self._lost(f"the primary closed it: {frame.message}")
                return
            error = error_from_code(frame.code, frame.message)
            self._log("warning", "gunicorn-ext: a message from slot %s was not handled: %s",
                      self.slot, frame.message)
            for callback in self._error_callbacks:
                try:
                    callback(frame.name, error)
                except Exception:
                    self._log("exception", "gunicorn-ext: on_error callback raised")

    def _call(self, name: str, payload: Any, src: int) -> Any:
        return run_handler(self._handlers, name, payload, src, f"worker slot {self.slot}", self.log)

    def _log(self, level: str, msg: str, *args: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(msg, *args)


def _where(to: int) -> str:
    return "the primary" if to == PRIMARY else f"slot {to}"


#: The process's bus. Import it as ``gunicorn_ext.worker``.
worker = Bus()

__all__ = ["Bus", "worker", "WorkerGone"]
