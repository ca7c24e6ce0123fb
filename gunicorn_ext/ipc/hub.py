"""The primary's end of the bus.

The hub lives in the Gunicorn arbiter. Before each worker is forked it makes a
socketpair for that worker's slot; the child keeps one end, the hub the other.
Nothing is on disk and nothing can connect from outside: only processes forked
by this arbiter hold a bus socket.

The hub routes; the thread is its reactor's (``ipc/reactor.py``): a single
background thread owns every connection. It reads frames, runs the primary's
handlers (``ipc/message.py``), relays worker-to-worker messages and replies, and
fans out broadcasts and publications. Calls from other threads (the arbiter's
own, or a user thread) are queued to it, so no connection state is ever shared
between threads.

Fork safety follows Gunicorn's control socket server (gunicorn/ctl/server.py):
the thread is parked before every fork and resumed in the parent, where the new
worker's end becomes a connection; the child closes everything of the hub's
except its own end (see #3509 and #3529 for the deadlocks that come from forking
while a thread holds a lock).
"""

from __future__ import annotations

import functools
import itertools
import os
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import frames
from .errors import (
    BridgeDown,
    BusClosed,
    IPCError,
    RequestTimeout,
    WorkerGone,
    error_from_code,
)
from .frames import ALL, PRIMARY, Err, Msg, Pub, Ready, Rep, Req, Sub, Unsub
from .message import ErrorCallback, Handler, Handlers, Message, Subscribers
from .reactor import READ as _READ
from .reactor import WRITE as _WRITE
from .reactor import Reactor

_HUP_ERR = select.EPOLLHUP | select.EPOLLERR
_RECV_SIZE = 64 * 1024  # below malloc's mmap threshold: a bigger recv buffer costs an mmap per call
#: Built-in request: the primary's pid and its workers (``/cluster`` uses it).
CLUSTER = "gunicorn_ext.cluster"
#: Built-in request: the bus bridge's state (``{"on": False}`` without one). Asked right
#: after a publish, it tells the publisher whether that publication left the instance
#: (a worker's frames reach the primary in order).
BRIDGE = "gunicorn_ext.bridge"
#: How long a relayed request's routing entry is kept when no reply comes.
_RELAY_HORIZON = 600.0
#: How often (seconds) routing entries past the horizon are dropped.
_SWEEP_INTERVAL = 10.0


class _Log:
    """Stand-in logger until the arbiter's is known (prints to stderr)."""

    def _emit(self, level: str, msg: str, *args: Any, **_: Any) -> None:
        import sys

        print(f"[gunicorn-ext] [{level}] {msg % args if args else msg}", file=sys.stderr)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        pass

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit("INFO", msg, *args)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit("WARNING", msg, *args)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit("ERROR", msg, *args)

    def exception(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit("ERROR", msg + "\n" + traceback.format_exc(), *args)


class _Conn:
    """The hub's end of one worker's socketpair."""

    __slots__ = ("sock", "fd", "push", "slot", "worker", "reader", "out", "pout", "subs", "ready",
                 "retired", "closed", "events", "on_call", "on_push")

    def __init__(self, sock: socket.socket, push: socket.socket, slot: int, worker: Any,
                 max_frame: int) -> None:
        #: Call channel: everything the worker sends, and replies to its requests.
        self.sock = sock
        self.fd = sock.fileno()
        #: Push channel: messages, requests and publications for the worker's listener.
        self.push = push
        self.slot = slot
        self.worker = worker  # the arbiter's Worker object; .pid is set after fork
        self.reader = frames.FrameReader(max_frame)
        self.out = bytearray()
        self.pout = bytearray()
        self.subs: set[str] = set()
        self.ready = False
        self.retired = False
        self.closed = False
        #: epoll interest currently registered for (call fd, push fd).
        self.events = [_READ, 0]
        #: The reactor's callbacks for the two fds (set by the hub).
        self.on_call: Callable[[int], None] | None = None
        self.on_push: Callable[[int], None] | None = None

    @property
    def pid(self) -> int:
        # Gunicorn sets worker.pid after fork() returns in the arbiter (it is
        # "[booting]" until then), which can be after the worker already spoke.
        pid = getattr(self.worker, "pid", 0)
        return pid if isinstance(pid, int) else 0

    def describe(self) -> str:
        return f"worker slot {self.slot} (pid {self.pid})"


class _Pending:
    """A request of the primary's, waiting for its reply."""

    __slots__ = ("event", "value", "error", "conn")

    def __init__(self, conn: _Conn | None) -> None:
        self.event = threading.Event()
        self.value: Any = None
        self.error: IPCError | None = None
        self.conn = conn


class Hub:
    """The primary's bus API and the thread that serves it.

    One instance, :data:`gunicorn_ext.primary`, exists per process. Register
    handlers on it from the Gunicorn config; call its send methods from hooks
    or handlers. Methods that talk to workers are safe from any thread.
    """

    def __init__(self) -> None:
        self.log: Any = _Log()
        self.max_frame = frames.DEFAULT_MAX_FRAME
        self.max_backlog = 64 * 1024 * 1024
        self._handlers = Handlers("the primary", allow_async=False)
        self._handlers.log = self.log
        self._ready_callbacks: list[Callable[[int, int], None]] = []
        self._local_subs = Subscribers("the primary", allow_async=False)
        self._local_subs.log = self.log
        #: The thread, its epoll, timers and fork parking.
        self.reactor = Reactor("gunicorn-ext-hub", "hub", after_fork_parent=self._after_fork_parent,
                               after_fork_child=self._after_fork_child,
                               on_turn_end=self._flush_dirty)
        # Everything below is owned by the hub thread once it runs.
        self._conns: dict[socket.socket, _Conn] = {}
        self._slots: dict[int, _Conn] = {}
        self._subs: dict[str, set[_Conn]] = {}
        self._relay: dict[int, tuple[_Conn, int, _Conn, float]] = {}
        self._pending: dict[int, _Pending] = {}
        self._dirty: set[_Conn] = set()
        self._ids = itertools.count(1)
        self._in_child = False
        #: The sockets of the worker being forked (``prepare_fork``), handed out after.
        self._forking: tuple[int, list[socket.socket], list[socket.socket], Any] | None = None
        #: In a freshly forked worker: its own call and push sockets, and its slot.
        self.child_end: tuple[socket.socket, socket.socket, int] | None = None
        #: The bus bridge to the other instances (``bus_bridge_url``), if any.
        self.bridge: Any = None
        self._handlers.add(CLUSTER, self._cluster)
        self._handlers.add(BRIDGE, self._bridge_status)

    def _cluster(self, msg: Message) -> dict[str, Any]:
        return {"primary_pid": os.getpid(), "workers": self.workers()}

    def _bridge_status(self, msg: Message) -> dict[str, Any]:
        if self.bridge is None:
            return {"on": False, "up": False}
        return {"on": True, **self.bridge.status()}

    # ------------------------------------------------------------------ setup

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: handle worker messages and requests called ``name``.

        The handler gets a :class:`Message` and runs in the hub thread, so it
        must be quick; its return value is the reply to a request. Registering
        a name again (say, after a HUP re-reads the config) replaces the old one.
        The hub thread has no event loop: an ``async def`` handler raises
        :class:`TypeError` here.
        """

        def register(fn: Handler) -> Handler:
            self._handlers.add(name, fn)
            return fn

        return register

    def on_error(self, fn: ErrorCallback) -> ErrorCallback:
        """Decorator: called as ``fn(name, error)`` when a one-way message the
        primary sent could not be handled by its receiver."""
        return self._handlers.on_error(fn)

    def on_ready(self, fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
        """Decorator: called as ``fn(slot, pid)`` in the hub thread when a worker
        has loaded its app and is about to serve (an ASGI worker: once its app's
        lifespan startup completed, so a startup must not wait for this call)."""
        self._ready_callbacks.append(fn)
        return fn

    def subscribe(self, topic: str) -> Callable[[Callable[[Message], None]], Callable[[Message], None]]:
        """Decorator: receive every publication on ``topic`` in the primary.

        Subscribers run in the hub thread, like handlers: ``async def`` raises
        :class:`TypeError` here.
        """

        def register(fn: Callable[[Message], None]) -> Callable[[Message], None]:
            self._local_subs.add(topic, fn)
            return fn

        return register

    @property
    def handler_names(self) -> frozenset[str]:
        return self._handlers.names

    def start(self, log: Any) -> None:
        """Start the hub thread (from ``on_starting``); idempotent across HUP."""
        self.log = self._handlers.log = self._local_subs.log = log
        was_running = self.reactor.running
        self.reactor.start(log)
        if not was_running:
            self.reactor.every(_SWEEP_INTERVAL, self._sweep)

    def start_bridge(self, url: str, name: str) -> None:
        """Bridge publications to the other instances named ``name`` through the
        store at ``url`` (``on_starting``, after :meth:`start`; see ``ipc/bridge.py``)."""
        if self.bridge is not None or not self.reactor.running:
            return
        from .bridge import Bridge

        self.bridge = Bridge(
            url, name,
            deliver=lambda topic, src, payload: self.reactor.call(
                lambda: self._route_pub(Pub(topic, src, payload), remote=True)),
            refused=lambda src, topic, reason: self.reactor.call(
                lambda: self._bridge_refused(src, topic, reason)),
            log=self.log, max_frame=self.max_frame, max_backlog=self.max_backlog)
        self.bridge.start()

    def stop(self) -> None:
        """Stop the thread and close every connection (from ``on_exit``)."""
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
        self.reactor.stop(cleanup=self._close_all)

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn, None)

    # ------------------------------------------------------ arbiter callbacks

    def prepare_fork(self, slot: int, worker: Any) -> None:
        """Make the socketpair for the worker about to be forked into ``slot``.

        Called from ``pre_fork`` in the arbiter's main thread. The fork handlers
        hand the ends out: the parent's end becomes a connection, the child's
        end becomes :attr:`child_end` in the child.
        """
        if not self.reactor.running:
            return
        # Two channels: replies travel apart from pushed messages, so a thread
        # waiting for its reply never competes with the worker's listener.
        call_p, call_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        push_p, push_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # All ends are close-on-exec (Python's default), so a USR2 re-exec
        # does not leak them into the new master.
        for s in (call_p, call_c, push_p, push_c):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        call_p.setblocking(False)
        push_p.setblocking(False)
        push_p.shutdown(socket.SHUT_RD)
        self._forking = (slot, [call_p, push_p], [call_c, push_c], worker)

    def retire(self, workers: list[Any]) -> None:
        """Mark connections of workers that are on their way out (HUP reload,
        scale down): they keep finishing conversations but lose their slot."""
        ages = {id(w) for w in workers}

        def do() -> None:
            for conn in self._conns.values():
                if id(conn.worker) in ages:
                    conn.retired = True
                    if self._slots.get(conn.slot) is conn:
                        del self._slots[conn.slot]

        self.reactor.call(do)

    def worker_exited(self, worker: Any) -> None:
        """The arbiter reaped ``worker`` (``child_exit``): drop its connection now,
        reporting whatever was still routed to it, without waiting for EOF."""

        def do() -> None:
            for conn in list(self._conns.values()):
                if conn.worker is worker:
                    self._close(conn, None)

        if self.reactor.running:
            self.reactor.call(do)

    def read_last_words(self, workers: list[Any], timeout: float = 1.0) -> None:
        """Dispatch everything ``workers``, which have exited, wrote on the bus, and
        return when that is done (or after ``timeout``).

        Called by the arbiter's thread before it accounts for their exits: a worker
        that says why it exits (the reporter's EXITING note) and ends at once is reaped
        by the arbiter while the note may still wait in the hub's socket, so the exit
        would be described without it. Each one's socket is read up to its end (the
        process is gone), or to what it holds now.
        """
        if not self.reactor.running or self.reactor.in_thread() or not workers:
            return
        ids = {id(w) for w in workers}
        done = threading.Event()

        def do() -> None:
            try:
                for conn in list(self._conns.values()):
                    if id(conn.worker) in ids:
                        for _ in range(64):  # bounded, should a child of it hold the socket
                            if not self._read(conn):
                                break
            finally:
                done.set()

        self.reactor.call(do)
        done.wait(timeout)

    def workers(self) -> list[dict[str, Any]]:
        """A snapshot of the connected workers, ordered by slot."""
        rows = [
            {"slot": c.slot, "pid": c.pid, "ready": c.ready, "retired": c.retired}
            for c in list(self._conns.values())
            if not c.closed
        ]
        return sorted(rows, key=lambda r: (r["slot"], r["retired"]))

    # ------------------------------------------------------------- public API

    def send(self, slot: int, name: str, payload: Any = None) -> None:
        """Send a one-way message to the worker in ``slot``.

        Raises :class:`WorkerGone` when no worker holds that slot right now. If
        it dies before reading the message, or has no handler for it, the
        failure is logged and passed to the :meth:`on_error` callbacks. Like
        every send, raises :class:`MessageTooLarge` or :class:`UnencodableMessage`
        at once, in the caller, for what the bus can't carry.
        """
        frames.check_address(name, slot)
        self._check_primary()
        if slot not in self._slots:
            raise WorkerGone(f"no worker in slot {slot}")
        frame = Msg(next(self._ids), name, slot, PRIMARY, payload)
        frames.encode(frame, self.max_frame)  # what the bus can't carry is refused here
        self.reactor.call(lambda: self._route_msg(None, frame))

    def broadcast(self, name: str, payload: Any = None) -> None:
        """Send a one-way message to every worker."""
        frames.check_address(name)
        self._check_primary()
        frame = Msg(next(self._ids), name, ALL, PRIMARY, payload)
        frames.encode(frame, self.max_frame)
        self.reactor.call(lambda: self._route_msg(None, frame))

    def publish(self, topic: str, payload: Any = None) -> None:
        """Publish on ``topic`` to every subscribed worker (and primary subscriber),
        and through the bus bridge, when there is one, to those of the other instances.

        Raises :class:`BridgeDown` when the bridge is down: the publication was
        delivered on this instance only.
        """
        frames.check_address(topic, what="a topic")
        self._check_primary()
        frame = Pub(topic, PRIMARY, payload)
        frames.encode(frame, self.max_frame)
        self.reactor.call(lambda: self._route_pub(frame))
        bridge = self.bridge
        if bridge is not None and not bridge.up:
            raise BridgeDown(bridge.down_text(topic))

    def request(self, slot: int, name: str, payload: Any = None, timeout: float = 5.0) -> Any:
        """Ask the worker in ``slot`` and wait for its reply.

        Raises :class:`WorkerGone`, :class:`NoHandler`, :class:`HandlerError` or
        :class:`RequestTimeout`; :class:`MessageTooLarge` or
        :class:`UnencodableMessage` before anything is sent. Not callable from
        a handler (the hub thread would wait on itself); use :meth:`send` there.
        """
        frames.check_address(name, slot)
        self._check_primary()
        if self.reactor.in_thread():
            raise RuntimeError("Hub.request() can't be called from a bus handler: it would deadlock")
        rid = next(self._ids)
        pending = _Pending(None)
        frame = Req(rid, name, slot, PRIMARY, payload)
        frames.encode(frame, self.max_frame)
        self._pending[rid] = pending
        self.reactor.call(lambda: self._primary_request(frame, pending))
        if not pending.event.wait(timeout):
            self._pending.pop(rid, None)
            raise RequestTimeout(f"request {name!r} to slot {slot}: no reply within {timeout}s")
        if pending.error is not None:
            raise pending.error
        return pending.value

    # The reactor's, for the supervisor, the control socket and even spread.

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the hub thread after ``delay`` seconds (any thread may call)."""
        self.reactor.call_later(delay, fn)

    def every(self, interval: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the hub thread every ``interval`` seconds."""
        self.reactor.every(interval, fn)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` in the hub thread whenever ``fd`` is readable."""
        self.reactor.watch(fd, callback)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd``."""
        self.reactor.unwatch(fd)

    def on_child(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in every process forked from the primary (close inherited fds)."""
        self.reactor.on_child(fn)

    def unretire(self, worker: Any) -> None:
        """Give ``worker`` its slot back (a rollout stopped before replacing it)."""

        def do() -> None:
            for conn in self._conns.values():
                if conn.worker is worker:
                    current = self._slots.get(conn.slot)
                    if current is None or current.closed or current.retired:
                        conn.retired = False
                        self._slots[conn.slot] = conn

        self.reactor.call(do)

    # -------------------------------------------------------- thread plumbing

    def _check_primary(self) -> None:
        if self._in_child:
            raise BusClosed("the primary's bus API was called in a worker; use gunicorn_ext.worker")
        if not self.reactor.running:
            raise BusClosed("the bus is not running (is gunicorn_ext.enable(globals()) in the config?)")

    def _flush_dirty(self) -> None:
        """At the end of a reactor turn: write what the turn left queued."""
        for conn in list(self._dirty):
            self._flush(conn)
        self._dirty.clear()

    # -- fork handlers (run in the forking thread, with the hub thread parked)

    def _after_fork_parent(self) -> None:
        """The worker's end went to the child: the parent's end becomes a connection."""
        forking, self._forking = self._forking, None
        if forking is None:
            return
        slot, (call, push), child, worker = forking
        for s in child:
            s.close()
        conn = _Conn(call, push, slot, worker, self.max_frame)
        self._conns[call] = conn
        old = self._slots.get(slot)
        if old is not None:
            old.retired = True
        self._slots[slot] = conn
        conn.on_call = functools.partial(self._on_call, conn)
        conn.on_push = functools.partial(self._on_push, conn)
        self.reactor.add(conn.fd, conn.on_call, _READ)
        self.reactor.add(push.fileno(), conn.on_push, 0)

    def _after_fork_child(self) -> None:
        """In the new process: keep our own end, close every other hub fd."""
        forking, self._forking = self._forking, None
        self._in_child = True
        for conn in list(self._conns.values()):
            conn.sock.close()
            conn.push.close()
        self._conns.clear()
        self._slots.clear()
        self._subs.clear()
        self._relay.clear()
        self._pending.clear()
        self._dirty.clear()
        self.bridge = None  # its own fork handler closed its descriptors
        if forking is not None:
            slot, parents, (call, push), _ = forking
            for s in parents:
                s.close()
            self.child_end = (call, push, slot)

    # ------------------------------------------------------------------- I/O

    def _on_call(self, conn: _Conn, mask: int) -> None:
        """The reactor's callback for a call channel: read it, write what waits."""
        if mask & (_READ | _HUP_ERR):
            self._read(conn)
        if mask & _WRITE and not conn.closed:
            self._flush(conn)

    def _on_push(self, conn: _Conn, mask: int) -> None:
        """The reactor's callback for a push channel (watched only while output waits)."""
        if mask & _WRITE and not conn.closed:
            self._flush(conn)

    def _read(self, conn: _Conn) -> bool:
        """Read and dispatch what the socket holds (one recv); True: more may follow."""
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._close(conn, f"read failed: {exc}")
            return False
        if not data:
            self._close(conn, None)
            return False
        for frame in conn.reader.feed(data):
            if conn.closed:
                return False
            try:
                self._dispatch(conn, frame)
            except Exception:
                self.log.exception("gunicorn-ext: failed to route a frame from %s", conn.describe())
        if conn.reader.error is not None and not conn.closed:
            self._close(conn, str(conn.reader.error))
        return not conn.closed

    def _queue(self, conn: _Conn, frame: frames.Frame) -> None:
        """Send a frame to a worker: replies on its call channel, the rest on push."""
        reply = type(frame) is Rep or (type(frame) is Err and not frame.oneway)  # type: ignore[union-attr]
        # Senders checked the size; re-addressing may add a few bytes, which
        # the workers' readers allow for.
        self._queue_bytes(conn, frames.encode(frame, self.max_frame + frames.ROUTING_SLACK), reply)

    def _queue_bytes(self, conn: _Conn, data: bytes, reply: bool) -> None:
        """Written through at once when nothing is queued before it (the common
        case); otherwise appended and flushed when the socket takes more."""
        if conn.closed:
            return
        out, sock = (conn.out, conn.sock) if reply else (conn.pout, conn.push)
        if out:
            out += data
        else:
            try:
                n = sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._close(conn, None if isinstance(exc, BrokenPipeError) else f"write failed: {exc}")
                return
            if n == len(data):
                return
            out += memoryview(data)[n:]
        self._dirty.add(conn)
        self.reactor.turn_end_wanted = True
        if len(out) > self.max_backlog:
            self._close(
                conn,
                f"it is not reading its bus messages ({len(out)} bytes queued, "
                f"limit {self.max_backlog})",
            )

    def _flush(self, conn: _Conn) -> None:
        """Write what is queued; ask epoll for writability while some is left."""
        for i, sock, out, base in ((0, conn.sock, conn.out, _READ), (1, conn.push, conn.pout, 0)):
            if conn.closed:
                return
            if out:
                try:
                    n = sock.send(out)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as exc:
                    reason = None if isinstance(exc, BrokenPipeError) else f"write failed: {exc}"
                    self._close(conn, reason)
                    return
                del out[:n]
            want = base | _WRITE if out else base
            have = conn.events[i]
            if have != want:
                self.reactor.interest(sock.fileno(), have, want)
                conn.events[i] = want

    def _close(self, conn: _Conn, reason: str | None) -> None:
        """Drop one connection; report everything still routed through it."""
        if conn.closed:
            return
        conn.closed = True
        self._dirty.discard(conn)
        if reason is not None and not conn.pout:
            # Best effort: tell the worker why, so its own log line says it
            # (id 0: no message or request of either side has it).
            try:
                conn.push.send(frames.encode(Err(0, BusClosed.code, reason, conn.slot, True)))
            except OSError:
                pass
        for i, sock in enumerate((conn.sock, conn.push)):
            self.reactor.remove(sock.fileno(), bool(conn.events[i]))
            sock.close()
        self._conns.pop(conn.sock, None)
        if reason is not None:
            self.log.error("gunicorn-ext: closing the bus connection of %s: %s", conn.describe(), reason)
        else:
            self.log.debug("gunicorn-ext: %s left the bus", conn.describe())
        if self._slots.get(conn.slot) is conn:
            del self._slots[conn.slot]
        for topic in conn.subs:
            subs = self._subs.get(topic)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self._subs[topic]
        gone = f"{conn.describe()} exited before replying" if reason is None else (
            f"{conn.describe()} was disconnected from the bus: {reason}"
        )
        for rid, (origin, oid, target, _) in list(self._relay.items()):
            if target is conn:
                del self._relay[rid]
                self._queue(origin, Err(oid, WorkerGone.code, gone))
            elif origin is conn:
                del self._relay[rid]
        for rid, pending in list(self._pending.items()):
            if pending.conn is conn:
                del self._pending[rid]
                pending.error = WorkerGone(gone)
                pending.event.set()

    def _sweep(self) -> None:
        now = time.monotonic()
        for rid, (_, _, _, t0) in list(self._relay.items()):
            if now - t0 > _RELAY_HORIZON:
                del self._relay[rid]

    # --------------------------------------------------------------- routing

    def _dispatch(self, conn: _Conn, frame: frames.Frame) -> None:
        if isinstance(frame, Req):
            frame.src = conn.slot
            if frame.dst == PRIMARY:
                self._handle_request(conn, frame)
            elif frame.dst >= 0:
                self._relay_request(conn, frame)
            else:
                self._queue(conn, Err(frame.id, "bad_request", "a request goes to one worker or the primary"))
        elif isinstance(frame, Msg):
            frame.src = conn.slot
            self._route_msg(conn, frame)
        elif isinstance(frame, (Rep, Err)):
            self._route_reply(conn, frame)
        elif isinstance(frame, Pub):
            frame.src = conn.slot
            self._route_pub(frame)
        elif isinstance(frame, Sub):
            conn.subs.add(frame.topic)
            self._subs.setdefault(frame.topic, set()).add(conn)
        elif isinstance(frame, Unsub):
            conn.subs.discard(frame.topic)
            subs = self._subs.get(frame.topic)
            if subs is not None:
                subs.discard(conn)
        elif isinstance(frame, Ready):
            conn.ready = True
            for fn in self._ready_callbacks:
                try:
                    fn(conn.slot, frame.pid)  # the worker's own pid: conn.pid may not be set yet
                except Exception:
                    self.log.exception("gunicorn-ext: on_ready callback failed")

    def _handle_request(self, conn: _Conn, frame: Req) -> None:
        self._queue_bytes(conn, self._handlers.handle(frame, self.max_frame), True)

    def _relay_request(self, origin: _Conn, frame: Req) -> None:
        target = self._slots.get(frame.dst)
        if target is None:
            self._queue(origin, Err(frame.id, WorkerGone.code, f"no worker in slot {frame.dst}"))
            return
        rid = next(self._ids)
        try:
            data = frames.encode(Req(rid, frame.name, frame.dst, frame.src, frame.payload),
                                 self.max_frame + frames.ROUTING_SLACK)
        except IPCError as exc:  # only a sender that bypassed its own checks gets here
            self._queue(origin, Err(frame.id, exc.code, str(exc)))
            return
        self._relay[rid] = (origin, frame.id, target, time.monotonic())
        self._queue_bytes(target, data, False)

    def _primary_request(self, frame: Req, pending: _Pending) -> None:
        target = self._slots.get(frame.dst)
        if target is None:
            self._pending.pop(frame.id, None)
            pending.error = WorkerGone(f"no worker in slot {frame.dst}")
            pending.event.set()
            return
        pending.conn = target
        self._queue(target, frame)

    def _route_reply(self, conn: _Conn, frame: Rep | Err) -> None:
        if isinstance(frame, Err) and frame.oneway:
            self._route_notice(conn, frame)
            return
        relay = self._relay.pop(frame.id, None)
        if relay is not None:
            origin, oid, _, _ = relay
            frame.id = oid
            self._queue(origin, frame)
            return
        pending = self._pending.pop(frame.id, None)
        if pending is not None:
            if isinstance(frame, Rep):
                pending.value = frame.payload
            else:
                pending.error = error_from_code(frame.code, frame.message)
            pending.event.set()
            return
        self.log.debug("gunicorn-ext: late reply %s from %s dropped (its request timed out)",
                       frame.id, conn.describe())

    def _route_notice(self, conn: _Conn, frame: Err) -> None:
        """A one-way message failed at its receiver: tell its sender."""
        if frame.dst == PRIMARY:
            self._handlers.report(frame.name, error_from_code(frame.code, frame.message))
            return
        origin = self._slots.get(frame.dst)
        if origin is not None:
            self._queue(origin, frame)
        else:
            self.log.warning("gunicorn-ext: failure notice for gone slot %s: %s", frame.dst, frame.message)

    def _route_msg(self, origin: _Conn | None, frame: Msg) -> None:
        dst = frame.dst
        if dst == PRIMARY:
            # Only a worker sends the primary a message (origin is its connection).
            notice = self._handlers.handle(frame, self.max_frame)
            if notice is not None and origin is not None:
                self._queue_bytes(origin, notice, False)
        elif dst == ALL:
            data = frames.encode(frame, self.max_frame + frames.ROUTING_SLACK)  # once for all
            for conn in list(self._slots.values()):
                self._queue_bytes(conn, data, False)
        else:
            target = self._slots.get(dst)
            if target is None:
                gone = WorkerGone(f"message {frame.name!r} to slot {dst}: no worker in that slot")
                if origin is None:
                    self._handlers.report(frame.name, gone)
                else:
                    self._queue_bytes(origin, self._handlers.error(frame, gone, self.max_frame),
                                      False)
            else:
                self._queue(target, frame)

    def _bridge_refused(self, src: int, topic: str, reason: str) -> None:
        """A publication did not leave the instance: tell its sender."""
        if src == PRIMARY:
            self._handlers.report(topic, BridgeDown(reason))
            return
        origin = self._slots.get(src)
        if origin is not None:
            self._queue(origin, Err(0, BridgeDown.code, reason, src, True, topic))

    def _route_pub(self, frame: Pub, remote: bool = False) -> None:
        if not remote and self.bridge is not None:
            reason = self.bridge.forward(frame.topic, frame.src, frame.payload)
            # publish() itself raises BridgeDown for the primary's own, when the bridge is down.
            if reason is not None and (frame.src != PRIMARY or self.bridge.up):
                self._bridge_refused(frame.src, frame.topic, reason)
        subs = self._subs.get(frame.topic)
        if subs:
            data = frames.encode(frame, self.max_frame + frames.ROUTING_SLACK)
            for conn in list(subs):
                self._queue_bytes(conn, data, False)
        self._local_subs.deliver(frame.topic, frame.payload, frame.src)


#: The process's hub. Import it as ``gunicorn_ext.primary``.
primary = Hub()

__all__ = ["Hub", "primary", "BusClosed"]
