"""Even spread: the primary accepts connections and hands each to the least busy worker.

Gunicorn leaves the choice of worker to whichever process the kernel wakes for
``accept()``, which favours the most recently idle one, and a gthread worker accepts
while all its threads are busy (Gunicorn #3433): a busy worker queues requests while a
sibling idles. Node.js made its ``cluster`` module round-robin for this reason. Here the
primary does the accepting, like Node's primary, and knows how busy each worker is:

* Each worker gets a ``SOCK_SEQPACKET`` socketpair with the primary (made before its
  fork, like the bus). In the worker, the shared listeners in ``worker.sockets`` are
  replaced by one :class:`DispatchedListener` on its end: an object with the socket
  methods Gunicorn's workers call (``fileno``, ``accept``, ``getsockname``,
  ``setblocking``, ``close``), whose ``accept()`` receives a connection's file
  descriptor from the primary (``SCM_RIGHTS``). Per-worker ports (``worker_ports_base``)
  stay the worker's own listeners.
* Each worker keeps a few numbers on a shared-memory board (an anonymous shared mmap
  made by the primary before any fork): its capacity (threads, or 1 for sync), its busy
  connections, and the connections it has received. Writing them costs no system call.
  The primary's view of a worker's room is ``capacity - busy - (sent - received)``. A
  gthread connection is busy from the moment Gunicorn hands it to the thread pool (it
  queues for a thread at once) until the main thread settles it (keeps it alive, parks
  or closes it): both are counted on the worker's main thread
  (:func:`~gunicorn_ext.gunicorn_internals.count_busy`), so no lock is taken and the
  request threads do one increment per request (:meth:`DispatchedListener.finished`).
* The primary (on the bus hub's thread, so it parks for forks with it) watches the
  listeners (edge-triggered), accepts, and sends each connection to the worker with
  the most room; on a tie the one that served the fewest requests over the last
  :data:`SPREAD_TAU` seconds, then the longest-waiting. When no worker has room, it
  leaves connections in the kernel's listen backlog (as without gunicorn-ext; when
  room runs out within a burst, the connection just accepted waits in the primary,
  like one given back) and raises a flag on the board; the first worker that frees a thread lowers it and wakes
  the primary with one message. So messages flow only while connections wait.
* Kept-alive connections: a connection stays with the worker that got it, so a few
  busy clients (or a balancer's keep-alive pool) can load one worker while another
  idles. Each worker also keeps its recent load on the board (its requests, each
  weighing ``exp(-age / LOAD_TAU)``) and its count over ``SPREAD_TAU``. Every
  :data:`SHED_LOOK` its main thread compares them with the others': when its recent
  load is clearly above the mean (:data:`SHED_ABOVE`, a burst), or its count leads
  the least served worker's by more than :data:`SHED_LEAD` of the mean (a share that
  drifts), both by :data:`SHED_MARGIN` at least, it answers one request on a kept-alive
  connection with ``Connection: close``
  (:func:`~gunicorn_ext.gunicorn_internals.close_one`, installed only until then, so
  requests cost nothing meanwhile): the client's next request opens a connection,
  which the primary gives to the least served worker with room. Bounded: one close per
  :data:`SHED_COOLDOWN` at most, never on a connection's first request, never on a
  request asking to upgrade (WebSocket), and the closes already made count as load and
  lead gone (so a worker closes about as many connections as its excess needs). The
  close is announced in a whole response, never mid-request, and never races a
  client's next request as closing an idle connection would. Sync workers close every
  connection after its request anyway. Behind nginx the upstream keep-alive pool opens
  another.
* A worker that stops gracefully (TERM, max_requests, recycling) says so, the primary
  acknowledges and sends it nothing more, and the worker hands back any connection it
  had not accepted yet; the primary gives those to another worker. A worker killed
  outright loses the connections queued to it (at most its room at the time), which
  the kernel would also have reset on its in-flight requests.

* On a graceful stop (SIGTERM) the supervisor calls :meth:`Dispatcher.drain` before
  Gunicorn closes the listeners: the primary accepts every connection queued in the
  backlog and stops listening (new connections are refused, so a balancer moves on),
  then hands the held ones to workers as they have room; only then are workers told
  to stop, so none of them is reset (Gunicorn #3397).

Only gthread workers are dispatched by default (``even_spread=None``): a sync worker
accepts only when it is idle, so the kernel's backlog is already one queue that the
first free worker takes from, and the extra hop through the primary would only cost
throughput. ``even_spread=True`` dispatches sync workers too (an even share of requests);
``False`` turns it off. Other classes (gevent, asgi, uvicorn) always keep the kernel's
accept.
"""

from __future__ import annotations

import array
import errno
import math
import mmap
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from . import gunicorn_internals as gi

#: Worker classes whose accept loop calls ``listener.accept()`` on ``worker.sockets``.
DISPATCHED_CLASSES = ("SyncWorker", "ThreadWorker")
#: Dispatched when ``even_spread`` is None (the default); see the module docstring.
DEFAULT_CLASSES = ("ThreadWorker",)

_FD = struct.Struct("i")  # one descriptor in an SCM_RIGHTS message
_FD_SIZE = _FD.size
#: The listeners are watched edge-triggered: no epoll_ctl each time the primary waits
#: for room and stops accepting.
_EDGE = select.EPOLLIN | select.EPOLLET
_CMSG = socket.CMSG_SPACE(_FD_SIZE)
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
#: The start of the message carrying a connection from listener i ("C" and its index).
_TAGS = [b"C" + bytes([i]) for i in range(256)]
#: How long a stopping worker waits for the primary's acknowledgement.
STOP_ACK_TIMEOUT = 1.0
#: While no worker has room, the primary also looks at the board this often (a missed
#: wake-up costs at most this long).
WAIT_POLL = 0.02

# The board: a header (the primary's "waiting for room" flag, and how many cells have
# ever been handed out, so a worker reads only those), then one cell per worker: capacity
# (0 until the worker is ready), running requests, connections received, kept-alive
# connections it closed to rebalance, its recent load (requests, decayed with
# LOAD_TAU) with the monotonic time it was last updated, and its load over a longer
# memory (decayed with SPREAD_TAU, as of the same time).
_HEADER = struct.Struct("=II")
_FLAG = struct.Struct("=I")  # at offset 0 of the header
_CELLS_USED = struct.Struct("=I")  # at offset 4
_CELL = struct.Struct("=iiIIddd")
_COUNTS = struct.Struct("=iiI")  # the first three fields of a cell
CELLS = 4096

#: The recent load of a worker is its requests, each weighing exp(-age / LOAD_TAU).
LOAD_TAU = 1.0
#: A gthread worker closes a kept-alive connection (``Connection: close`` on a response)
#: while its recent load is above SHED_ABOVE times the workers' mean (a burst) ...
SHED_ABOVE = 1.2
#: ... or while its count over SPREAD_TAU leads the least served worker's by more than
#: SHED_LEAD of the workers' mean (a share that drifts: the reconnecting client goes to
#: that worker, so the shares converge to within about that lead) ...
SHED_LEAD = 0.08
#: ... by at least SHED_MARGIN requests either way (a trickle of requests is left alone),
#: and at most one per SHED_COOLDOWN seconds.
SHED_MARGIN = 4.0
SHED_COOLDOWN = 0.1
#: A worker compares its load with the others' at most once per SHED_LOOK seconds (the
#: loads move over LOAD_TAU; looking on every request cost a read of every cell).
SHED_LOOK = 0.01


#: Which worker gets a connection when several have the same room: the one that served
#: the fewest requests, each weighing exp(-age / SPREAD_TAU). A memory of several
#: seconds, not LOAD_TAU's one: a worker that was left behind (a kept-alive client
#: stayed elsewhere) gets the next connections until its count caught up, so the
#: workers' shares converge rather than drift with how long each held a busy client.
SPREAD_TAU = 10.0


def _decayed(load: float, stamp: float, now: float, tau: float = LOAD_TAU) -> float:
    return load * math.exp(-(now - stamp) / tau) if now > stamp else load


def _tenths(served: float, stamp: float, now: float) -> int:
    """A worker's requests over SPREAD_TAU as of *now*, in tenths (a tie below that)."""
    return int(10.0 * (served * math.exp((stamp - now) / SPREAD_TAU) if now > stamp else served))


def dispatched(worker_class_name: str, even_spread: bool | None) -> bool:
    """Whether workers of this class take their connections from the primary."""
    if even_spread is None:
        return worker_class_name in DEFAULT_CLASSES
    return bool(even_spread) and worker_class_name in DISPATCHED_CLASSES


def _accept(listener: socket.socket) -> tuple[int, Any]:
    """The descriptor and address of a connection ``listener`` accepts (the primary only
    hands the descriptor on)."""
    conn, addr = listener.accept()
    return conn.detach(), addr


def _send_fd(sock: socket.socket, tag: bytes, fd: int) -> None:
    sock.sendmsg([tag], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd))])


def _recv(sock: socket.socket) -> tuple[bytes, int | None]:
    """One message and the descriptor it carries (None if it carries none)."""
    data, ancdata, _, _ = sock.recvmsg(256, _CMSG)
    fd = None
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            if len(payload) == _FD_SIZE:  # one descriptor, as the primary sends
                fds: Any = _FD.unpack(payload)
            else:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - (len(payload) % _FD_SIZE)])
                for extra in fds[1:]:
                    os.close(extra)  # never more than one; close anything else
            fd = fds[0] if fds else None
    return data, fd


def _pack_addr(addr: Any) -> bytes:
    """The client address ``accept()`` gave the primary, for the message carrying the
    connection: the worker then needs no ``getpeername()`` (on its main thread each
    system call is a turn at the GIL, behind the request threads)."""
    if type(addr) is tuple and addr and type(addr[0]) is str:
        if len(addr) == 2:  # IPv4
            return f"T{addr[0]}\0{addr[1]}".encode()
        return b"T" + "\0".join(str(x) for x in addr).encode()
    return b""


def _unpack_addr(data: bytes) -> Any:
    """The address :func:`_pack_addr` packed, or None (the worker asks the socket)."""
    if data[:1] != b"T":
        return None
    try:
        parts = data[1:].decode().split("\0")
        if len(parts) == 2:  # IPv4
            return parts[0], int(parts[1])
        return (parts[0], *map(int, parts[1:]))
    except (UnicodeDecodeError, ValueError):
        return None


def _offset(cell: int) -> int:
    return _HEADER.size + cell * _CELL.size


# ----------------------------------------------------------------- in the primary


class _Worker:
    """The primary's view of one worker."""

    __slots__ = ("sock", "worker", "cell", "offset", "sent", "stopping", "since")

    def __init__(self, sock: socket.socket, worker: Any, cell: int, since: int) -> None:
        self.sock = sock
        self.worker = worker
        self.cell = cell
        self.offset = _offset(cell)
        self.sent = 0
        self.stopping = False
        #: The primary's count of connections handed out when this one last got one
        #: (ties: the longest-waiting, the smallest).
        self.since = since


class Dispatcher:
    """The primary's side: accepts on the listeners, hands connections to workers.

    Everything but :meth:`prepare_fork` and the fork handlers runs on the hub thread.
    """

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.enabled = False
        self.log: Any = None
        self.board: mmap.mmap | None = None
        self._free_cells: list[int] = []
        self._listeners: list[socket.socket] = []
        self._watching = False
        self._waiting = False
        self._poll_armed = False
        self._workers: dict[int, _Worker] = {}  # fd of the primary's end -> worker
        self._handed = 0  # connections handed out (_Worker.since)
        # (fd, listener index, packed client address) given back by workers, or drained
        self._returned: list[tuple[int, int, bytes]] = []
        self._forking: tuple[socket.socket, socket.socket, Any, int] | None = None
        self._child: tuple[socket.socket, int] | None = None
        self._child_listeners: list[Any] = []
        self._fork_handlers = False
        self._lock = threading.Lock()  # _forking and _free_cells: main thread vs hub thread

    # -- setup, in the arbiter's main thread

    def install(self, server: Any, log: Any) -> None:
        """Turn dispatching on for *server* (from ``on_starting``, after the hub started)."""
        self.log = log
        self.enabled = True
        if self.board is None:
            self.board = mmap.mmap(-1, _offset(CELLS))  # anonymous and shared across fork
            self._free_cells = list(range(CELLS - 1, -1, -1))
        log.info("gunicorn-ext: even spread on: the primary accepts connections and hands each "
                 "to the worker with the most free threads (even_spread=False turns it off)")
        if not self._fork_handlers:
            self._fork_handlers = True
            os.register_at_fork(after_in_parent=self._after_fork_parent,
                                after_in_child=self._after_fork_child)

    def prepare_fork(self, server: Any, worker: Any) -> None:
        """Make the socketpair and board cell of the worker about to be forked (``pre_fork``)."""
        if not self.enabled or self.board is None:
            return
        listeners = [lst.sock for lst in gi.listeners(server)]
        if [id(s) for s in listeners] != [id(s) for s in self._listeners]:
            self.hub.call_later(0, lambda: self._set_listeners(listeners))
        with self._lock:
            if not self._free_cells:
                self.log.error("gunicorn-ext: more than %s workers; this one accepts from the "
                               "kernel", CELLS)
                return
            cell = self._free_cells.pop()
        _CELL.pack_into(self.board, _offset(cell), 0, 0, 0, 0, 0.0, 0.0, 0.0)
        if cell >= _CELLS_USED.unpack_from(self.board, 4)[0]:
            _CELLS_USED.pack_into(self.board, 4, cell + 1)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setblocking(False)
        with self._lock:
            self._forking = (parent, child, worker, cell)
        self._child_listeners = gi.listeners(server)

    def _after_fork_parent(self) -> None:
        with self._lock:
            forking, self._forking = self._forking, None
        if forking is None:
            return
        parent, child, worker, cell = forking
        child.close()
        self.hub.call_later(0, lambda: self._add(parent, worker, cell))

    def _after_fork_child(self) -> None:
        with self._lock:
            forking, self._forking = self._forking, None
        for w in self._workers.values():
            w.sock.close()
        self._workers.clear()
        for fd, _, _ in self._returned:
            os.close(fd)
        self._returned.clear()
        self._listeners = []
        self.enabled = False
        if forking is not None:
            parent, child, _, cell = forking
            parent.close()
            self._child = (child, cell)

    def child_listener(self, worker: Any) -> DispatchedListener | None:
        """In a new worker (``post_fork``): its :class:`DispatchedListener`, installed in
        ``worker.sockets``; None when dispatching is off."""
        child, self._child = self._child, None
        if child is None or self.board is None:
            return None
        return attach(worker, child[0], self._child_listeners, self.board, child[1])

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
        board = self.board
        if board is None:
            return len(self._returned)
        return len(self._returned) + sum(
            max(0, w.sent - _COUNTS.unpack_from(board, w.offset)[2])
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
                fd, addr = _accept(sock)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                break
            self._returned.append((fd, index, _pack_addr(addr)))
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

    def _add(self, sock: socket.socket, worker: Any, cell: int) -> None:
        w = _Worker(sock, worker, cell, self._handed)
        self._workers[sock.fileno()] = w
        self.hub.watch(sock.fileno(), lambda: self._on_worker(w))
        self._update()

    def _drop_worker(self, worker: Any) -> None:
        for w in list(self._workers.values()):
            if w.worker is worker:
                self._drop(w)

    def _drop(self, w: _Worker) -> None:
        if self._workers.pop(w.sock.fileno(), None) is None:
            return
        self.hub.unwatch(w.sock.fileno())
        w.sock.close()
        assert self.board is not None
        _CELL.pack_into(self.board, w.offset, 0, 0, 0, 0, 0.0, 0.0, 0.0)
        with self._lock:
            self._free_cells.append(w.cell)
        self._update()

    def _on_worker(self, w: _Worker) -> None:
        """One message from a worker. The socket is watched level-triggered, so another
        one queued behind it raises the next event: no receive that finds none (an
        exception each time a worker wakes us)."""
        try:
            data, fd = _recv(w.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(w)
            return
        if not data:
            self._drop(w)
            return
        kind = data[:1]
        if kind == b"S":
            w.stopping = True
            try:
                w.sock.send(b"A")
            except OSError:
                self._drop(w)
                return
        elif kind == b"R" and fd is not None and len(data) >= 2:
            self._returned.append((fd, data[1], data[2:]))
        elif fd is not None:
            os.close(fd)
        # b"W" (room freed while we waited) needs nothing but the update below.
        self._update()

    def _update(self) -> None:
        """Hand out given-back connections; when room came back while connections wait
        in the backlog, take them; watch the listeners while there are any."""
        while self._returned:
            w = self._pick()
            if w is None:
                break
            fd, index, addr = self._returned.pop(0)
            self._give(w, fd, index, addr)
        if self._returned:  # held connections (given back, or drained at stop) wait for room
            self._set_waiting(True)
        elif self._waiting:
            # The listeners are watched edge-triggered: what waits in the backlog raises
            # no event of its own, so take it now.
            self._set_waiting(False)
            for index in range(len(self._listeners)):
                if not self._take(index):
                    break
        if self._listeners and not self._watching:
            reactor = self.hub.reactor
            for i, lst in enumerate(self._listeners):
                reactor.call(lambda fd=lst.fileno(), i=i: reactor.add(
                    fd, lambda _mask: self._on_listener(i), _EDGE))
            self._watching = True
        elif not self._listeners and self._watching:
            self._unwatch()

    def _set_waiting(self, waiting: bool) -> None:
        """Raise (or lower) the board's flag that asks workers to wake us when they free
        a thread. The worker that wakes us lowers it (so its siblings send nothing), and
        it is raised again each time we still find no room."""
        if self.board is None:
            return
        self._waiting = waiting
        if _FLAG.unpack_from(self.board, 0)[0] != waiting:
            _FLAG.pack_into(self.board, 0, 1 if waiting else 0)
        if waiting and not self._poll_armed:
            # A worker may free room between our look and the flag, or its message may
            # be lost: look again while waiting, so a missed wake-up costs WAIT_POLL at most.
            self._poll_armed = True
            self.hub.call_later(WAIT_POLL, self._poll_waiting)

    def _poll_waiting(self) -> None:
        self._poll_armed = False
        if self._waiting:
            self._update()
        if self._waiting:
            self._set_waiting(True)  # still no room: keep looking

    def _unwatch(self) -> None:
        if self._watching:
            for lst in self._listeners:
                self.hub.unwatch(lst.fileno())
            self._watching = False

    def _pick(self) -> _Worker | None:
        """The worker with the most room; on a tie the one that served the fewest
        requests lately (over SPREAD_TAU, in tenths: where a client that a busy worker's
        ``Connection: close`` sent back lands), then the longest-waiting. One read of
        each cell; the loads (an exp each) only on a tie."""
        board = self.board
        assert board is not None
        best: _Worker | None = None
        best_room = 0
        best_key: tuple[int, int] | None = None
        best_stamp = best_served = now = 0.0
        for w in self._workers.values():
            if w.stopping:
                continue
            capacity, running, received, _, _, stamp, served = _CELL.unpack_from(board, w.offset)
            if capacity <= 0:
                continue  # not ready yet
            room = capacity - (running if running > 0 else 0) - (w.sent - received)
            if room > best_room:
                best, best_room, best_key, best_stamp, best_served = w, room, None, stamp, served
            elif room == best_room and best is not None:
                if not now:
                    now = time.monotonic()
                if best_key is None:
                    best_key = (_tenths(best_served, best_stamp, now), best.since)
                key = (_tenths(served, stamp, now), w.since)
                if key < best_key:
                    best, best_key = w, key
        return best

    def _on_listener(self, index: int) -> None:
        """Connections are queued (an edge-triggered event): hand them out, after the
        connections given back (they wait for room, and so do these)."""
        if index >= len(self._listeners):
            return
        if self._returned:
            self._set_waiting(True)
        else:
            self._take(index)

    def _take(self, index: int) -> bool:
        """Accept what is queued on listener *index* and hand it out, until the backlog
        is empty (True) or no worker has room (False: the connections wait in the
        kernel's backlog, as without gunicorn-ext, and the board's flag asks workers to
        wake us as they free a thread). A worker is picked before the first accept
        (with no room the backlog is left alone) and then for each connection accepted,
        so none before the accept that finds the backlog empty; when room runs out
        within a burst, the connection just accepted waits with those given back."""
        if index >= len(self._listeners):
            return True
        listener = self._listeners[index]
        w = self._pick()
        if w is None:
            # Raise the flag, then look once more: a worker that freed a thread
            # after our look and before the flag sends nothing.
            self._set_waiting(True)
            w = self._pick()
            if w is None:
                return False
        for _ in range(64):  # bounded: other fds get their turn
            try:
                fd, addr = _accept(listener)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno == errno.EBADF:  # the arbiter closed its listeners (stopping)
                    self._unwatch()
                    self._listeners = []
                    return True
                # Out of fds or memory, or the listener stopped (the restart gate shuts it
                # while no worker runs): stop watching, look again shortly.
                if exc.errno not in (errno.EINVAL, errno.ENOTSOCK):
                    self.log.error("gunicorn-ext: accept failed (%s); pausing 0.1 s", exc)
                self._unwatch()
                self.hub.call_later(0.1, self._update)
                return True
            if w is None:
                # The next worker is picked once there is a connection for it (no pick
                # before the accept that finds the backlog empty).
                w = self._pick()
                if w is None:
                    self._set_waiting(True)
                    w = self._pick()
                    if w is None:
                        # Room ran out within this burst (the workers just got the
                        # connections before it): this one waits first, like one given back.
                        self._returned.append((fd, index, _pack_addr(addr)))
                        return False
            self._give(w, fd, index, _pack_addr(addr))
            w = None
        # More may be queued, and no new connection may raise another event: come back.
        self.hub.call_later(0, lambda: self._on_listener(index))
        return True

    def _give(self, w: _Worker, fd: int, index: int, addr: bytes = b"") -> None:
        try:
            _send_fd(w.sock, _TAGS[index] + addr, fd)
        except OSError:
            # The worker is gone or stopping: another worker takes the connection.
            self._returned.append((fd, index, addr))
            self._drop(w)
            return
        os.close(fd)
        w.sent += 1
        self._handed += 1
        w.since = self._handed


# ------------------------------------------------------------------ in the worker


class DispatchedListener:
    """What a worker accepts from instead of the shared listeners: its end of the
    primary's socketpair, with the socket methods Gunicorn's sync and gthread
    workers call on a listener, and its cell on the primary's board.

    A sync worker (*threaded* False) holds one connection at a time: it is busy from
    the connection it receives until it comes back to ``accept()``. A gthread worker
    (*worker* its ThreadWorker) counts on its main thread the connections it hands to
    its thread pool and those the pool finished (:func:`~gunicorn_ext.gunicorn_internals.count_busy`):
    their difference is its busy connections, written to the board on each change, with
    no lock and nothing on the request threads but one increment per request
    (:meth:`finished`).
    """

    def __init__(self, sock: socket.socket, listeners: list[Any], capacity: int,
                 threaded: bool, board: mmap.mmap, cell: int, worker: Any = None) -> None:
        self.sock = sock
        self.worker = worker
        self.listeners = listeners  # Gunicorn's listener objects, by index
        self.capacity = capacity
        self.threaded = threaded
        self.board = board
        self.offset = _offset(cell)
        self.received = 0
        self.running = 0  # sync: 1 while it holds a connection
        self.submitted = 0  # gthread: connections handed to the thread pool ...
        self.completed = 0  # ... and settled once the pool finished them
        self.served = 0  # requests ended (request threads; a lost increment is harmless)
        self._served_seen = 0
        self.load = 0.0  # recent requests (decayed with LOAD_TAU) ...
        self.long = 0.0  # ... and with SPREAD_TAU ...
        self.stamp = time.monotonic()  # ... as of this time
        self.shed = 0  # kept-alive connections closed to rebalance
        self._credit = 0.0  # the load those closes will take away (decaying like load)
        self._credit_stamp = self.stamp
        self._mine = 0.0  # this worker's load when a close was asked for ...
        self._lead = 0.0  # ... and its lead over the least served worker (SPREAD_TAU)
        self._lead_credit = 0.0  # the lead its closes gave away (decaying like _credit)
        self._looking = False  # a close is asked for (gi.close_one)
        self._next_shed = 0.0
        self._next_look = 0.0
        self._lock = threading.Lock()  # sync workers' cell (request and main thread)
        self._last = 0
        self._names: dict[int, Any] = {}  # listener index -> its address (asked once)
        self._kinds: dict[int, tuple[int, int, int]] = {}  # listener index -> family, type, proto
        self._stopping = False
        self._closed = False
        # The board's fields a gthread worker's main thread writes (or reads) on every
        # request (submitted_one, settled), as one-int views: a store is an item
        # assignment, where pack_into parsed its arguments and took the buffer each time.
        view = memoryview(board)
        self._busy = view[self.offset + 4:self.offset + 8].cast("i")  # _COUNTS' 2nd field
        self._received = view[self.offset + 8:self.offset + 12].cast("I")  # and 3rd
        self._flag = view[0:4].cast("I")  # _FLAG, the primary's "waiting for room"

    # -- Gunicorn's listener surface

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        if not self._closed:
            self.sock.setblocking(flag)

    def getsockname(self) -> Any:
        """The address of the shared listener the last connection came in on (asked of
        the socket once: Gunicorn asks for each connection, on its main thread)."""
        name = self._names.get(self._last)
        if name is None:
            name = self._names[self._last] = self.listeners[self._last].sock.getsockname()
        return name

    def accept(self) -> tuple[socket.socket, Any]:
        """The next connection the primary sent; ``BlockingIOError`` when there is none."""
        if self._closed:
            raise BlockingIOError(errno.EAGAIN, "dispatch closed")
        while True:
            try:
                data, fd = _recv(self.sock)
            except BlockingIOError:
                if not self.threaded and self.running:
                    self._publish(running=0)  # back in accept(): a sync worker is free again
                raise
            if fd is None:
                if not data:
                    raise BlockingIOError(errno.EAGAIN, "the primary closed the dispatch socket")
                continue  # an acknowledgement: nothing to accept
            self._last = index = data[1] if len(data) >= 2 and data[1] < len(self.listeners) else 0
            if self.threaded:
                # Busy from now: Gunicorn hands it to the pool at once, and that count
                # (submitted) writes this one with it.
                self.received += 1
            else:
                self._publish(received=1, running=1)
            kind = self._kinds.get(index)
            if kind is None:
                lst = self.listeners[index].sock
                kind = self._kinds[index] = (lst.family, lst.type, lst.proto)
            # The listener's family, type and protocol: the socket need not ask the kernel.
            client = socket.socket(*kind, fileno=fd)
            addr = _unpack_addr(data[2:])
            if addr is None:
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
        if self._looking:
            gi.cancel_close(self.worker)
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
                        _send_fd(sock, b"R" + (data[1:] or b"\0"), fd)
                    finally:
                        os.close(fd)
                elif data == b"A" or not data:
                    break
        except OSError:
            pass  # the primary is gone or slow: nothing more to hand back
        finally:
            sock.close()

    # -- the board

    def ready(self) -> None:
        """The worker booted: it can take *capacity* requests. It starts with the mean
        recent load of the others, so the primary does not send a newcomer every new
        connection until its load catches up."""
        with self._lock:
            self.stamp = time.monotonic()
            n, load, long, _ = self._others(self.stamp)
            self.load, self.long = (load / n, long / n) if n else (0.0, 0.0)
        self._publish(ready=True)

    def stop_soon(self) -> None:
        """The worker will stop (TERM, max_requests, recycling): send it nothing more."""
        if self._stopping or self._closed:
            return
        self._stopping = True
        try:
            self.sock.send(b"S", socket.MSG_DONTWAIT)
        except OSError:
            self._stopping = False  # close() says it again

    def finished(self) -> None:
        """A request ended: it counts in the recent load. (A gthread worker's request
        hook does the increment itself, :func:`gunicorn_ext.hooks._request_hooks`.)"""
        if self.threaded:
            self.served += 1  # folded into the load by the main thread (settled)
        else:
            self._publish(served=True)

    # -- a gthread worker's main thread (gi.count_busy)

    def submitted_one(self) -> None:
        """A connection goes to the thread pool: it holds or waits for a thread."""
        self.submitted += 1
        # The cell's busy and received counts (accept() counted it): one store each.
        self._busy[0] = self.submitted - self.completed
        self._received[0] = self.received

    def settled(self) -> None:
        """The pool finished a connection's request and the main thread settled it
        (kept it alive, parked, closed or re-queued it): one thread fewer is busy. Wakes
        the primary if it waits for room; at most every SHED_LOOK, folds the requests
        served into the recent load and looks whether to close a kept-alive connection."""
        self.completed += 1
        self._busy[0] = self.submitted - self.completed
        if self._flag[0]:
            self._wake()
        now = time.monotonic()
        if now >= self._next_look:
            self._look(now)

    def _look(self, now: float) -> None:
        """Fold the requests served into the recent load, write the whole cell, and ask
        for a kept-alive connection to be closed while this worker's load is clearly
        above the others' (see :meth:`_wants_close`)."""
        self._next_look = now + SHED_LOOK
        served = self.served
        self._fold(now, served - self._served_seen)
        self._served_seen = served
        _CELL.pack_into(self.board, self.offset, self.capacity, self.submitted - self.completed,
                        self.received, self.shed, self.load, now, self.long)
        want = (now >= self._next_shed and not self._stopping and not self._closed
                and self._wants_close(now))
        if want and not self._looking:
            self._looking = True
            gi.close_one(self.worker, self._may_close, self._closed_one)
        elif not want and self._looking:
            self._looking = False
            gi.cancel_close(self.worker)

    def _wants_close(self, now: float) -> bool:
        """Whether this worker's recent load, less what earlier closes will take away,
        exceeds the workers' mean by SHED_ABOVE and SHED_MARGIN (a burst), or its count
        over SPREAD_TAU leads the least served worker's by more than SHED_LEAD of the
        mean and SHED_MARGIN, less the lead its earlier closes gave away (a share that
        drifts: the client it closes on goes to that least served worker, see
        :meth:`Dispatcher._pick`)."""
        n, others, others_long, low_long = self._others(now)
        mine = _decayed(self.load, self.stamp, now)
        mean = (others + mine) / (n + 1)
        eff = mine - _decayed(self._credit, self._credit_stamp, now)
        self._mine = mine
        if eff > max(mean * SHED_ABOVE, mean + SHED_MARGIN):
            return True
        mine_long = _decayed(self.long, self.stamp, now, SPREAD_TAU)
        mean_long = (others_long + mine_long) / (n + 1)
        self._lead = mine_long - low_long
        owed = _decayed(self._lead_credit, self._credit_stamp, now)
        return mine_long > mean_long and self._lead - owed > max(
            mean_long * SHED_LEAD, SHED_MARGIN)

    def _may_close(self, req: Any) -> bool:
        """In a request thread, while a close is asked for: whether this request's
        response may close its connection (see :func:`~gunicorn_ext.gunicorn_internals.may_close_after`:
        never a connection's first request, where the primary just chose this worker, nor
        one that asked to upgrade)."""
        return not self._stopping and not self._closed and gi.may_close_after(req)

    def _closed_one(self) -> None:
        """In the request thread whose response closes its connection: that connection's
        share of the load leaves with it, over about LOAD_TAU; no other close for
        SHED_COOLDOWN."""
        now = time.monotonic()
        with self._lock:
            credit = _decayed(self._credit, self._credit_stamp, now)
            self._credit = credit + (self._mine - credit) / max(
                1, gi.gthread_connections(self.worker))
            # The lead this close gives away: the next close waits until it is back.
            self._lead_credit = max(_decayed(self._lead_credit, self._credit_stamp, now),
                                    self._lead)
            self._credit_stamp = now
            self.shed += 1
            self._next_shed = now + SHED_COOLDOWN
            self._looking = False

    def _wake(self) -> None:
        """The primary waits for room (its flag on the board is up): take the flag down
        (the primary raises it again if it still has no room, so siblings freeing a
        thread meanwhile send nothing) and wake it with one message."""
        if self._stopping or self._closed:
            return
        _FLAG.pack_into(self.board, 0, 0)
        try:
            self.sock.send(b"W", socket.MSG_DONTWAIT)
        except OSError:
            pass  # buffer full (wake-ups pending anyway) or the primary gone

    def _fold(self, now: float, served: int) -> None:
        """Add *served* requests to the loads, decayed to *now*."""
        stamp = self.stamp
        self.load = _decayed(self.load, stamp, now) + served
        self.long = _decayed(self.long, stamp, now, SPREAD_TAU) + served
        self.stamp = now

    def _others(self, now: float) -> tuple[int, float, float, float]:
        """The other ready workers, in one pass over the board: how many they are, the
        sum of their recent loads, the sum of their counts over SPREAD_TAU, and the least
        of those counts (inf when there is no other)."""
        board = self.board
        n, load, long, low = 0, 0.0, 0.0, float("inf")
        for cell in range(min(CELLS, _CELLS_USED.unpack_from(board, 4)[0])):
            offset = _offset(cell)
            if offset == self.offset:
                continue
            capacity, _, _, _, recent, stamp, served = _CELL.unpack_from(board, offset)
            if capacity > 0:
                x = _decayed(served, stamp, now, SPREAD_TAU)
                n, load, long, low = n + 1, load + _decayed(recent, stamp, now), long + x, min(low, x)
        return n, load, long, low

    def _publish(self, received: int = 0, running: int | None = None, ready: bool = False,
                 served: bool = False) -> None:
        """Update this worker's whole cell (a sync worker's, or any worker's when it
        becomes ready); wake the primary if it waits for room and this freed some.
        *served*: one more request in the recent load."""
        with self._lock:
            before = self.running
            self.received += received
            if running is not None:
                self.running = running
            if served:
                self._fold(time.monotonic(), 1)
            busy = self.submitted - self.completed if self.threaded else self.running
            _CELL.pack_into(self.board, self.offset, self.capacity, busy, self.received,
                            self.shed, self.load, self.stamp, self.long)
        if (ready or self.running < before) and _FLAG.unpack_from(self.board, 0)[0]:
            self._wake()


def attach(worker: Any, sock: socket.socket, listeners: list[Any], board: mmap.mmap,
           cell: int) -> DispatchedListener:
    """In the worker (``post_fork``): accept from *sock* instead of the shared listeners."""
    threaded = type(worker).__name__ == "ThreadWorker"
    capacity = max(1, int(getattr(worker.cfg, "threads", 1) or 1)) if threaded else 1
    dl = DispatchedListener(sock, listeners, capacity, threaded, board, cell, worker)
    if threaded:
        gi.count_busy(worker, dl.submitted_one, dl.settled)
        gi.close_in_request_thread(worker)
    shared = {id(lst) for lst in listeners}
    gi.set_sockets(worker, [dl] + [s for s in gi.sockets_of(worker) if id(s) not in shared])
    return dl
