"""Refuse connections while an instance has no worker: stop and resume listening.

Gunicorn's arbiter keeps its listening sockets open for as long as it runs, so
with every worker gone (a crash loop held back by backoff or the breaker) the
kernel goes on completing handshakes into the backlog and clients hang until
their own timeout. A refused connection is what lets nginx (or any client-side
balancer) move to the next instance at once; a 503 would not do, because the
nginx templates rightly treat a 503 as the app's answer, not a dead backend.

The listeners are Gunicorn's own objects (``arbiter.LISTENERS``), changed in
place so that workers forked later inherit them as they are and USR2 passes the
same file descriptors:

* TCP: ``shutdown(SHUT_RD)`` on a listening socket makes Linux stop listening
  (queued connections are reset, new ones refused) while the socket keeps its
  descriptor and its bound port; ``listen()`` resumes it. A socket bound to
  port 0 would lose its port, so such a listener is left alone.
* Unix: a shut-down AF_UNIX listener can't listen again, so its socket file is
  renamed aside (``connect()`` then fails at once) and its queued connections
  are closed; it is renamed back before a worker is forked. Abstract-namespace
  sockets are left alone.

Per-worker ports (worker_ports.py) are opened by each worker, so they close
with it and need nothing here. Runs in the arbiter's main thread.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

from .. import gunicorn_internals as gi

_SUFFIX = ".gunicorn-ext-paused"


class Gate:
    """Stops and resumes the arbiter's listeners; ``closed`` while they refuse."""

    def __init__(self) -> None:
        self.closed = False
        #: Unix listeners renamed aside: id(listener) -> (path, aside path).
        self._aside: dict[int, tuple[str, str]] = {}
        #: TCP listeners that were shut down (ids).
        self._shut: set[int] = set()
        self._warned = False

    def close(self, listeners: list[Any], log: Any, why: str) -> None:
        """Stop accepting on every listener that can be resumed later."""
        if self.closed or not listeners:
            return
        names = []
        for lnr in listeners:
            try:
                if self._close_one(lnr, log):
                    names.append(str(lnr))
            except OSError as exc:
                log.warning("gunicorn-ext: could not stop listening on %s: %s", lnr, exc)
        self.closed = True
        if names:
            log.warning("gunicorn-ext: no worker is running (%s): not listening on %s, so "
                        "clients are refused at once instead of waiting", why, ", ".join(names))

    def open(self, listeners: list[Any], log: Any) -> bool:
        """Listen again (before a fork); False, with a log line, when one can't."""
        if not self.closed:
            return True
        ok = True
        names = []
        for lnr in listeners:
            try:
                if self._open_one(lnr):
                    names.append(str(lnr))
            except OSError as exc:
                ok = False
                log.error("gunicorn-ext: could not listen again on %s: %s; not starting a "
                          "worker until it can", lnr, exc)
        if ok:
            self.closed = False
            if names:
                log.info("gunicorn-ext: listening again on %s for a new worker", ", ".join(names))
        return ok

    def release(self, log: Any) -> None:
        """The arbiter is stopping: put renamed unix sockets back (TCP ones just close)."""
        for path, aside in list(self._aside.values()):
            try:
                os.rename(aside, path)
            except OSError as exc:
                log.warning("gunicorn-ext: could not put %s back: %s", path, exc)
        self._aside.clear()
        self._shut.clear()
        self.closed = False

    # ------------------------------------------------------------------

    def _close_one(self, lnr: Any, log: Any) -> bool:
        sock = gi.listener_socket(lnr)
        if sock is None:
            return False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            if gi.listener_port(lnr) == 0:
                self._warn_once(lnr, log, "bound to port 0")
                return False
            sock.shutdown(socket.SHUT_RD)
            if _listening(sock):  # not Linux: shutdown did not stop it
                self._warn_once(lnr, log, "this kernel keeps it listening after shutdown()")
                return False
            self._shut.add(id(lnr))
            return True
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            if not isinstance(path, str) or not path or path.startswith("\0"):
                self._warn_once(lnr, log, "an abstract or unnamed unix socket")
                return False
            aside = path + _SUFFIX
            os.rename(path, aside)
            self._aside[id(lnr)] = (path, aside)
            _drain(sock)
            return True
        return False

    def _open_one(self, lnr: Any) -> bool:
        key = id(lnr)
        if key in self._shut:
            sock = gi.listener_socket(lnr)
            before = sock.getsockname()
            sock.listen(gi.listener_backlog(lnr))
            if sock.getsockname() != before:  # pragma: no cover - the port was not locked
                raise OSError(errno.EADDRNOTAVAIL, f"the port changed to {sock.getsockname()}")
            self._shut.discard(key)
            return True
        if key in self._aside:
            path, aside = self._aside[key]
            os.link(aside, path)  # fails if someone took the path meanwhile: never overwrite
            os.unlink(aside)
            del self._aside[key]
            return True
        return False

    def _warn_once(self, lnr: Any, log: Any, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("gunicorn-ext: %s stays open while no worker runs (%s)", lnr, why)


def _listening(sock: socket.socket) -> bool:
    """Whether ``sock`` listens (SO_ACCEPTCONN; False where the kernel can't say)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except (AttributeError, OSError):
        return False


#: Worker classes that stop accepting as soon as they get their TERM (the sync and
#: gthread workers); a short pause covers them.
STOP_AT_ONCE = ("SyncWorker", "ThreadWorker")
#: ...how short.
STOP_PAUSE = 0.1


def wait_stopped_accepting(worker_class: str, listeners: list[Any], pids: list[int],
                           timeout: float) -> None:
    """After TERMing the workers ``pids``: wait until they stopped accepting on the
    listeners, so that :func:`refuse_new` can shut those down (``timeout`` at most).

    A listener shut down while a worker still polls it fails that worker's ``accept()``
    with EINVAL, logged with a traceback (over and over under asyncio, whose loop then
    sees the listener readable every turn). The sync and gthread workers stop at once
    (a short pause); gevent and the asyncio workers (``-k asgi``, uvicorn) notice the TERM
    when their loop next looks, up to a second later, and then close their copies of
    the listeners, which :func:`wait_released` sees.
    """
    if worker_class in STOP_AT_ONCE:
        time.sleep(min(STOP_PAUSE, timeout))
    else:
        wait_released(listeners, pids, timeout)


def wait_released(listeners: list[Any], pids: list[int], timeout: float) -> bool:
    """Wait until none of ``pids`` holds a copy of a listener's socket; False at timeout.

    Reads ``/proc/<pid>/fd`` (Linux, where :func:`refuse_new` stops a listener); an
    exited process holds nothing; without ``/proc`` it returns True at once.
    """
    if not os.path.isdir("/proc/self/fd"):
        return True
    inodes = set()
    for lnr in listeners:
        sock = gi.listener_socket(lnr)
        if sock is not None:
            try:
                inodes.add(f"socket:[{os.fstat(sock.fileno()).st_ino}]")
            except (OSError, ValueError):  # closed already
                pass
    deadline = time.monotonic() + timeout
    left = list(pids)
    while True:
        left = [pid for pid in left if _holds(pid, inodes)]
        if not left:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _holds(pid: int, inodes: set[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # exited (or not ours to read)
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:  # closed meanwhile
            pass
    return False


def refuse_new(listeners: list[Any], log: Any) -> None:
    """Graceful stop without even spread: make the listeners refuse new connections.

    Workers accept from the kernel themselves and keep their copy of each listener
    until they exit, so closing the arbiter's copy (all Gunicorn does) leaves new
    clients waiting in the backlog until the last worker exits and resets them. A
    shut-down listener refuses them at once, so a balancer moves on. Call it after
    the workers stopped accepting (:func:`wait_stopped_accepting`: a worker polling a
    shut-down listener fails).
    """
    for lnr in listeners:
        sock = gi.listener_socket(lnr)
        if sock is None or sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
            continue
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError as exc:
            log.warning("gunicorn-ext: graceful stop: could not stop listening on %s: %s", lnr, exc)


def _drain(sock: socket.socket) -> None:
    """Close the connections already queued on a (non-blocking) listener."""
    for _ in range(10000):
        try:
            conn, _addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.close()
