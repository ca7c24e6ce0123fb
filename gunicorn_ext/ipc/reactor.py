"""The primary's reactor: one background thread around one epoll.

It runs, in that thread: a callback for each watched file descriptor when epoll
reports it, functions other threads hand it (:meth:`Reactor.call`, through a
wake-up pipe), and timers (:meth:`Reactor.call_later`, :meth:`Reactor.every`). The
hub routes the bus on it (``ipc/hub.py``); the control socket and even spread
watch their descriptors on it. Everything it runs must be quick: it is one thread
for all of them.

Fork safety: the thread is parked before every fork and resumed in the parent
(:class:`~gunicorn_ext.forksafe.ForkParking`); in the child, the epoll, the pipe,
the queued calls and timers are dropped, and the :meth:`Reactor.on_child`
callbacks close what else was inherited.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from ..forksafe import ForkParking

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
#: Longest sleep in epoll (seconds) when no timer is due sooner.
_MAX_WAIT = 1.0

#: Called with the epoll event mask of its descriptor.
FdHandler = Callable[[int], None]


class Reactor:
    """One thread, one epoll, calls from other threads and timers; see the module docstring.

    ``name`` is the thread's name, ``what`` the reactor's in log lines ("hub").
    ``after_fork_parent`` runs in the parent after each fork while the thread is still
    parked (so it may change the thread's state); ``after_fork_child`` in the child,
    before the reactor's own clean-up. ``on_turn_end()``, when given, runs in the thread
    at the end of a turn (after its events and queued calls, before the timers) in which
    :attr:`turn_end_wanted` was set.
    """

    def __init__(self, name: str, what: str, after_fork_parent: Callable[[], None] | None = None,
                 after_fork_child: Callable[[], None] | None = None,
                 on_turn_end: Callable[[], None] | None = None) -> None:
        self.name = name
        self.log: Any = None
        #: True from :meth:`start` to :meth:`stop` (False in a forked child).
        self.running = False
        self._after_fork_child_owner = after_fork_child
        self._on_turn_end = on_turn_end
        #: Set in the thread to have ``on_turn_end`` run at the end of this turn.
        self.turn_end_wanted = False
        self._ep: select.epoll | None = None
        self._handlers: dict[int, FdHandler] = {}
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._ids = itertools.count(1)
        self._child_callbacks: list[Callable[[], None]] = []
        self._thread_ident = 0
        self._parking = ForkParking(what, after_parent=after_fork_parent,
                                    after_child=self._after_fork_child)

    # ------------------------------------------------------------- lifecycle

    def start(self, log: Any) -> None:
        """Make the epoll and start the thread; idempotent."""
        self.log = log
        if self.running:
            return
        self._ep = select.epoll()
        self._ep.register(self._parking.pipe.open(), READ)
        self.running = True
        self._parking.start(log, self._run, self.name)

    def stop(self, cleanup: Callable[[], None] | None = None) -> None:
        """Stop the thread (the parking closes its pipe); run ``cleanup`` (in the caller,
        the thread gone); close the epoll."""
        if not self.running:
            return
        self.running = False
        self._parking.stop()
        if cleanup is not None:
            cleanup()
        if self._ep is not None:
            self._ep.close()
            self._ep = None

    def in_thread(self) -> bool:
        """True when called from the reactor's own thread."""
        return threading.get_ident() == self._thread_ident

    # ------------------------------------------------------------ public API

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the thread: now when called from it, else at its next turn."""
        if threading.get_ident() == self._thread_ident:
            fn()
        else:
            self._calls.append(fn)
            self._parking.pipe.wake()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the thread after ``delay`` seconds (any thread may call)."""
        when = time.monotonic() + delay
        self.call(lambda: heapq.heappush(self._timers, (when, next(self._ids), fn)))

    def every(self, interval: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the thread every ``interval`` seconds."""

        def tick() -> None:
            try:
                fn()
            finally:
                self.call_later(interval, tick)

        self.call_later(interval, tick)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` in the thread whenever ``fd`` is readable (any thread may call)."""
        self.call(lambda: self.add(fd, lambda _mask: callback(), READ))

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (any thread may call)."""
        self.call(lambda: self.remove(fd, True))

    def on_child(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in every process forked from this one (close inherited fds)."""
        self._child_callbacks.append(fn)

    # ------------------------------------- descriptors (in the thread, or parked)

    def add(self, fd: int, handler: FdHandler, events: int = READ) -> None:
        """Call ``handler(mask)`` for the events of ``fd``; ask epoll for ``events`` (0: none yet)."""
        assert self._ep is not None
        if events:
            self._ep.register(fd, events)
        self._handlers[fd] = handler

    def interest(self, fd: int, have: int, want: int) -> None:
        """Change what epoll reports for ``fd``, from ``have`` to ``want`` (0: nothing)."""
        ep = self._ep
        assert ep is not None
        if not want:
            ep.unregister(fd)
        elif not have:
            ep.register(fd, want)
        else:
            ep.modify(fd, want)

    def remove(self, fd: int, registered: bool) -> None:
        """Forget ``fd`` (before it is closed); ``registered``: epoll still reports it."""
        if self._handlers.pop(fd, None) is not None and registered and self._ep is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        self._thread_ident = threading.get_ident()
        ep = self._ep
        assert ep is not None
        handlers = self._handlers
        pipe = self._parking.pipe
        wake_r = pipe.fileno()
        timers = self._timers
        calls = self._calls
        parking = self._parking
        on_turn_end = self._on_turn_end
        while self.running:
            if parking.requested:
                parking.park()
                continue
            timeout = _MAX_WAIT
            if timers:
                timeout = min(timeout, max(0.0, timers[0][0] - time.monotonic()))
            try:
                events = ep.poll(timeout)
            except OSError:
                events = []
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler(mask)
                    except Exception:
                        self.log.exception("gunicorn-ext: watcher of fd %s failed", fd)
                elif fd == wake_r:
                    pipe.drain()
            while calls:
                fn = calls.popleft()
                try:
                    fn()
                except Exception:
                    self.log.exception("gunicorn-ext: bus call failed")
            now = time.monotonic()
            if self.turn_end_wanted and on_turn_end is not None:
                self.turn_end_wanted = False
                try:
                    on_turn_end()
                except Exception:
                    self.log.exception("gunicorn-ext: %s turn failed", self._parking.what)
            while timers and timers[0][0] <= now:
                _, _, fn = heapq.heappop(timers)
                try:
                    fn()
                except Exception:
                    self.log.exception("gunicorn-ext: timer failed")

    def _after_fork_child(self) -> None:
        """In the new process: drop the thread's state and close the reactor's fds (the
        parking closes the pipe)."""
        self.running = False
        self._thread_ident = 0
        if self._after_fork_child_owner is not None:
            self._after_fork_child_owner()
        self._calls.clear()
        self._handlers.clear()
        self._timers.clear()
        for fn in self._child_callbacks:
            try:
                fn()
            except Exception:
                pass
        if self._ep is not None:
            try:
                self._ep.close()
            except OSError:
                pass
            self._ep = None
