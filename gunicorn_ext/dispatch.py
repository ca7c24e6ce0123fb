"""Even spread: the primary accepts connections and hands each to the least busy worker.

Gunicorn leaves the choice of worker to whichever process the kernel wakes for
``accept()``, which favours the most recently idle one, and a gthread worker accepts
while all its threads are busy: a busy worker queues requests while a sibling idles.
Node.js made its ``cluster`` module round-robin for this reason. Here the primary
does the accepting, like Node's primary, and is told by each worker how many
requests it can start now:

* Each sync/gthread worker gets a ``SOCK_SEQPACKET`` socketpair with the primary
  (made before its fork, like the bus). In the worker, the shared listeners in
  ``worker.sockets`` are replaced by one :class:`DispatchedListener` on its end: an
  object with the socket methods Gunicorn's workers call (``fileno``, ``accept``,
  ``getsockname``, ``setblocking``, ``close``), whose ``accept()`` receives a
  connection's file descriptor from the primary (``SCM_RIGHTS``). Per-worker ports
  (``worker_ports_base``) stay the worker's own listeners.
* The worker reports ``free`` (requests it can start: its threads, or 1 for sync,
  minus those running) and how many connections it has received, after it boots and
  after each request. The primary keeps ``free - (sent - received)`` per worker.
* The primary (on the bus hub's thread, so it parks for forks with it) watches the
  listeners only while some worker can take a connection; then it accepts one and
  sends it to the worker with the most room, the longest-waiting one on a tie.
  While every worker is busy, connections wait in the kernel's listen backlog, as
  without gunicorn-ext.
* A worker that stops gracefully (TERM, max_requests, recycling) says so, the primary
  acknowledges and sends it nothing more, and the worker hands back any connection it
  had not accepted yet; the primary gives those to another worker. A worker killed
  outright loses the connections queued to it (at most its ``free`` at the time),
  which the kernel would also have reset on its in-flight requests.

* On a graceful stop (SIGTERM) the supervisor calls :meth:`Dispatcher.drain` before
  Gunicorn closes the listeners: the primary accepts every connection queued in the
  backlog and stops listening (new connections are refused, so a balancer moves on),
  then hands the held ones to workers as they have room; only then are workers told
  to stop, so none of them is reset (Gunicorn #3397).

Only the ``sync`` and ``gthread`` worker classes are dispatched this way; other
classes (gevent, asgi, uvicorn) keep accepting from the kernel. ``even_spread=False``
turns it off.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import threading
import time
from typing import Any

#: Worker classes whose accept loop calls ``listener.accept()`` on ``worker.sockets``.
DISPATCHED_CLASSES = ("SyncWorker", "ThreadWorker")

_REPORT = struct.Struct("!cII")  # b"F", free, received
_FD_SIZE = array.array("i").itemsize
_CMSG = socket.CMSG_SPACE(_FD_SIZE)
#: How long a stopping worker waits for the primary's acknowledgement.
STOP_ACK_TIMEOUT = 1.0


def dispatched(worker_class_name: str) -> bool:
    """True when workers of this class can take connections from the primary."""
    return worker_class_name in DISPATCHED_CLASSES


def _send_fd(sock: socket.socket, tag: bytes, fd: int) -> None:
    sock.sendmsg([tag], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _recv(sock: socket.socket) -> tuple[bytes, int | None]:
    """One message and the descriptor it carries (None if it carries none)."""
    data, ancdata, _, _ = sock.recvmsg(64, _CMSG)
    fd = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - (len(payload) % _FD_SIZE)])
            for extra in fds[1:]:
                os.close(extra)  # never more than one; close anything else
            fd = fds[0] if fds else None
    return data, fd


# ----------------------------------------------------------------- in the primary


class _Worker:
    """The primary's view of one worker's capacity."""

    __slots__ = ("sock", "worker", "free", "sent", "received", "stopping", "since", "ready")

    def __init__(self, sock: socket.socket, worker: Any) -> None:
        self.sock = sock
        self.worker = worker
        self.free = 0
        self.sent = 0
        self.received = 0
        self.stopping = False
        self.ready = False
        self.since = time.monotonic()  # when it last got a connection (ties: longest-waiting)

    @property
    def room(self) -> int:
        return self.free - (self.sent - self.received)


class Dispatcher:
    """The primary's side: accepts on the listeners, hands connections to workers.

    Everything but :meth:`prepare_fork` and the fork handlers runs on the hub thread.
    """

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.enabled = False
        self.log: Any = None
        self._listeners: list[socket.socket] = []
        self._watching = False
        self._workers: dict[int, _Worker] = {}  # fd of the primary's end -> worker
        self._returned: list[tuple[int, int]] = []  # (fd, listener index) given back by workers
        self._forking: tuple[socket.socket, socket.socket, Any] | None = None
        self._child_end: socket.socket | None = None
        self._child_listeners: list[Any] = []
        self._fork_handlers = False
        self._lock = threading.Lock()  # guards _forking between the main thread and fork handlers

    # -- setup, in the arbiter's main thread

    def install(self, server: Any, log: Any) -> None:
        """Turn dispatching on for *server* (from ``on_starting``, after the hub started)."""
        self.log = log
        self.enabled = True
        log.info("gunicorn-ext: even spread on: the primary accepts connections and hands each "
                 "to the worker with the most free threads (even_spread=False turns it off)")
        if not self._fork_handlers:
            self._fork_handlers = True
            os.register_at_fork(after_in_parent=self._after_fork_parent,
                                after_in_child=self._after_fork_child)

    def prepare_fork(self, server: Any, worker: Any) -> None:
        """Make the socketpair for the worker about to be forked (``pre_fork``)."""
        if not self.enabled:
            return
        listeners = [lst.sock for lst in server.LISTENERS]
        if [id(s) for s in listeners] != [id(s) for s in self._listeners]:
            self.hub.call_later(0, lambda: self._set_listeners(listeners))
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setblocking(False)
        with self._lock:
            self._forking = (parent, child, worker)
        self._child_listeners = list(server.LISTENERS)

    def _after_fork_parent(self) -> None:
        with self._lock:
            forking, self._forking = self._forking, None
        if forking is None:
            return
        parent, child, worker = forking
        child.close()
        self.hub.call_later(0, lambda: self._add(parent, worker))

    def _after_fork_child(self) -> None:
        with self._lock:
            forking, self._forking = self._forking, None
        for w in self._workers.values():
            w.sock.close()
        self._workers.clear()
        for fd, _ in self._returned:
            os.close(fd)
        self._returned.clear()
        self._listeners = []
        self.enabled = False
        if forking is not None:
            parent, child, _ = forking
            parent.close()
            self._child_end = child

    def child_listener(self, worker: Any) -> DispatchedListener | None:
        """In a new worker (``post_fork``): its :class:`DispatchedListener`, installed in
        ``worker.sockets``; None when dispatching is off."""
        end, self._child_end = self._child_end, None
        if end is None:
            return None
        return attach(worker, end, self._child_listeners)

    def worker_exited(self, worker: Any) -> None:
        """``child_exit``: forget the worker (its queued connections died with it)."""
        if self.enabled:
            self.hub.call_later(0, lambda: self._drop_worker(worker))

    # -- graceful stop, from the arbiter's main thread

    def drain(self, listeners: list[Any], timeout: float) -> int:
        """Take every connection queued on *listeners* (Gunicorn's listener objects) and
        stop listening on them; the held connections then go to workers as they have
        room (see :meth:`drained`). Returns how many were queued."""
        done = threading.Event()
        held = [0]

        def run() -> None:
            try:
                held[0] = self._drain([lnr.sock for lnr in listeners])
            finally:
                done.set()

        self.hub.call_later(0, run)
        done.wait(timeout)
        return held[0]

    def drained(self) -> bool:
        """True when every held or handed-out connection has been accepted by a worker."""
        return self.undelivered() == 0

    def undelivered(self) -> int:
        """Connections held by the primary or sent to a worker that has not accepted them."""
        return len(self._returned) + sum(max(0, w.sent - w.received)
                                         for w in list(self._workers.values()))

    # -- the hub thread

    def _drain(self, listeners: list[socket.socket]) -> int:
        self._unwatch()
        self._listeners = []  # never watched again
        held = 0
        for index, sock in enumerate(listeners):
            try:
                sock.setblocking(False)
                if sock.family == socket.AF_UNIX:
                    # A shut-down unix listener refuses connect() but keeps its queue.
                    sock.shutdown(socket.SHUT_RD)
                    held += self._take_queued(sock, index)
                else:
                    # TCP's shutdown() resets the queue: take it first. A connection that
                    # completes its handshake in the microseconds between is reset.
                    held += self._take_queued(sock, index)
                    sock.shutdown(socket.SHUT_RD)
            except OSError as exc:
                self.log.warning("gunicorn-ext: graceful stop: could not drain %s: %s",
                                 sock, exc)
        self._update()
        return held

    def _take_queued(self, sock: socket.socket, index: int) -> int:
        n = 0
        while n < 100000:  # bounded by the backlog in practice
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                break
            self._returned.append((conn.detach(), index))
            n += 1
        return n

    def _set_listeners(self, listeners: list[socket.socket]) -> None:
        self._unwatch()
        for lst in listeners:
            # Workers no longer set the shared listeners non-blocking; the primary must,
            # so a wake-up with nothing to accept never blocks the hub thread.
            lst.setblocking(False)
        self._listeners = listeners
        self._update()

    def _add(self, sock: socket.socket, worker: Any) -> None:
        w = _Worker(sock, worker)
        self._workers[sock.fileno()] = w
        self.hub.watch(sock.fileno(), lambda: self._on_worker(w))

    def _drop_worker(self, worker: Any) -> None:
        for w in list(self._workers.values()):
            if w.worker is worker:
                self._drop(w)

    def _drop(self, w: _Worker) -> None:
        if self._workers.pop(w.sock.fileno(), None) is None:
            return
        self.hub.unwatch(w.sock.fileno())
        # Connections it had given back but not yet re-sent stay in _returned.
        w.sock.close()
        self._update()

    def _on_worker(self, w: _Worker) -> None:
        while True:
            try:
                data, fd = _recv(w.sock)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(w)
                return
            if not data:
                self._drop(w)
                return
            kind = data[:1]
            if kind == b"F" and len(data) == _REPORT.size:
                _, free, received = _REPORT.unpack(data)
                w.free, w.received, w.ready = free, received, True
            elif kind == b"S":
                w.stopping = True
                try:
                    w.sock.send(b"A")
                except OSError:
                    self._drop(w)
                    return
            elif kind == b"R" and fd is not None and len(data) == 2:
                self._returned.append((fd, data[1]))
            elif fd is not None:
                os.close(fd)
        self._update()

    def _update(self) -> None:
        """Hand out given-back connections, then watch the listeners iff a worker has room."""
        while self._returned:
            w = self._pick()
            if w is None:
                break
            fd, index = self._returned.pop(0)
            self._give(w, fd, index)
        want = bool(self._listeners) and self._pick() is not None
        if want and not self._watching:
            for i, lst in enumerate(self._listeners):
                self.hub.watch(lst.fileno(), lambda i=i: self._on_listener(i))
            self._watching = True
        elif not want and self._watching:
            self._unwatch()

    def _unwatch(self) -> None:
        if self._watching:
            for lst in self._listeners:
                self.hub.unwatch(lst.fileno())
            self._watching = False

    def _pick(self) -> _Worker | None:
        best: _Worker | None = None
        for w in self._workers.values():
            if not w.ready or w.stopping or w.room <= 0:
                continue
            if best is None or w.room > best.room or (w.room == best.room and w.since < best.since):
                best = w
        return best

    def _on_listener(self, index: int) -> None:
        if index >= len(self._listeners):
            return
        listener = self._listeners[index]
        for _ in range(64):  # bounded: other fds get their turn
            w = self._pick()
            if w is None:
                break
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno == errno.EBADF:  # the arbiter closed its listeners (stopping)
                    self._unwatch()
                    self._listeners = []
                    return
                # Out of fds or memory, or the listener stopped (the restart gate shuts it
                # while no worker runs): stop watching, look again shortly.
                if exc.errno not in (errno.EINVAL, errno.ENOTSOCK):
                    self.log.error("gunicorn-ext: accept failed (%s); pausing 0.1 s", exc)
                self._unwatch()
                self.hub.call_later(0.1, self._update)
                return
            self._give(w, conn.detach(), index)
        self._update()

    def _give(self, w: _Worker, fd: int, index: int) -> None:
        try:
            _send_fd(w.sock, b"C" + bytes([index]), fd)
        except OSError:
            # The worker is gone or stopping: another worker takes the connection.
            self._returned.append((fd, index))
            self._drop(w)
            return
        os.close(fd)
        w.sent += 1
        w.since = time.monotonic()


# ------------------------------------------------------------------ in the worker


class DispatchedListener:
    """What a worker accepts from instead of the shared listeners: its end of the
    primary's socketpair, with the socket methods Gunicorn's sync and gthread
    workers call on a listener.

    A sync worker (*threaded* False) holds one connection at a time: it is free
    again whenever it comes back to ``accept()``, so it reports there. A gthread
    worker reports its free threads around each request (``started``/``finished``)
    and after each connection it receives.
    """

    def __init__(self, sock: socket.socket, listeners: list[Any], capacity: int,
                 threaded: bool) -> None:
        self.sock = sock
        self.listeners = listeners  # Gunicorn's listener objects, by index
        self.capacity = capacity
        self.threaded = threaded
        self.received = 0
        self.running = 0
        self._lock = threading.Lock()
        self._last = 0
        self._stopping = False
        self._closed = False

    # -- Gunicorn's listener surface

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        if not self._closed:
            self.sock.setblocking(flag)

    def getsockname(self) -> Any:
        """The address of the shared listener the last connection came in on."""
        return self.listeners[self._last].sock.getsockname()

    def accept(self) -> tuple[socket.socket, Any]:
        """The next connection the primary sent; ``BlockingIOError`` when there is none."""
        if self._closed:
            raise BlockingIOError(errno.EAGAIN, "dispatch closed")
        while True:
            try:
                data, fd = _recv(self.sock)
            except BlockingIOError:
                if not self.threaded:
                    self.running = 0
                    self._report()  # back in accept(): a sync worker is free again
                raise
            if fd is None:
                if not data:
                    raise BlockingIOError(errno.EAGAIN, "the primary closed the dispatch socket")
                continue  # an acknowledgement: nothing to accept
            self.received += 1
            self._last = data[1] if len(data) == 2 and data[1] < len(self.listeners) else 0
            if self.threaded:
                self._report()
            client = socket.socket(fileno=fd)
            try:
                addr = client.getpeername()
            except OSError:
                addr = ""
            return client, addr

    def close(self) -> None:
        """Stop: tell the primary, then give back what it had sent but we never accepted."""
        if self._closed:
            return
        self._closed = True
        sock = self.sock
        try:
            sock.setblocking(True)
            sock.settimeout(STOP_ACK_TIMEOUT)
            if not self._stopping:
                sock.send(b"S")
            while True:
                data, fd = _recv(sock)
                if fd is not None:
                    try:
                        _send_fd(sock, b"R" + (data[1:2] or b"\0"), fd)
                    finally:
                        os.close(fd)
                elif data == b"A" or not data:
                    break
        except OSError:
            pass  # the primary is gone or slow: nothing more to hand back
        finally:
            sock.close()

    # -- reports to the primary

    def ready(self) -> None:
        """The worker booted: it can take *capacity* requests."""
        self._report()

    def stop_soon(self) -> None:
        """The worker will stop (TERM, max_requests, recycling): send it nothing more."""
        if self._stopping or self._closed:
            return
        self._stopping = True
        try:
            self.sock.send(b"S", socket.MSG_DONTWAIT)
        except OSError:
            self._stopping = False  # close() says it again

    def started(self) -> None:
        if self.threaded:
            with self._lock:
                self.running += 1
            self._report()

    def finished(self) -> None:
        if self.threaded:
            with self._lock:
                self.running = max(0, self.running - 1)
            self._report()

    def _report(self) -> None:
        if self._closed or self._stopping:
            return
        with self._lock:
            msg = _REPORT.pack(b"F", max(0, self.capacity - self.running), self.received)
        try:
            self.sock.send(msg, socket.MSG_DONTWAIT)
        except OSError:
            pass  # buffer full or the primary gone; the next report corrects it


def attach(worker: Any, sock: socket.socket, listeners: list[Any]) -> DispatchedListener:
    """In the worker (``post_fork``): accept from *sock* instead of the shared listeners."""
    threaded = type(worker).__name__ == "ThreadWorker"
    capacity = max(1, int(getattr(worker.cfg, "threads", 1) or 1)) if threaded else 1
    dl = DispatchedListener(sock, listeners, capacity, threaded)
    shared = {id(lst) for lst in listeners}
    worker.sockets = [dl] + [s for s in worker.sockets if id(s) not in shared]
    return dl
