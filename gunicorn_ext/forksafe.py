"""Fork safety for the primary's background threads: park the thread around every fork.

The arbiter forks workers while gunicorn-ext threads run beside its main thread (the
hub's reactor, the bus bridge, the admin endpoint). A fork taken while one of them
holds a lock, or is half-way through changing its state, leaves the child with that
lock held for good (see Gunicorn #3509 and #3529, and its ``ctl/`` server, which parks
its thread the same way). So each such thread owns a :class:`ForkParking`:

* before every ``os.fork()`` of the process, the forking thread asks the background
  thread to park, wakes it, and waits (at most 5 s, then one warning line) until it has;
* in the parent, the owner's ``after_parent`` runs (the thread is still parked, so the
  owner may touch the thread's state), then the thread resumes;
* in the child, the parking state is made anew (the parent's condition may be held by
  nobody who exists there) and the owner's ``after_child`` closes what the child must not
  use.

:meth:`ForkParking.start` starts the thread, :meth:`ForkParking.stop` ends it; the
thread's loop calls :meth:`ForkParking.park` whenever :attr:`ForkParking.requested` is set.
The thread waits on :attr:`ForkParking.pipe` (a :class:`WakePipe`) beside its own
descriptors, so a fork, a stop or the owner (:meth:`WakePipe.wake`) can wake it; the
parking opens the pipe at start and closes it at stop and in the child.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

#: Longest wait for the thread to park before a fork goes ahead anyway (one warning).
PARK_TIMEOUT = 5.0


class WakePipe:
    """A non-blocking self-pipe that wakes a thread waiting in select/epoll.

    :meth:`open` makes it and returns the descriptor to wait on (readable once woken);
    :meth:`wake` (any thread) writes a byte, :meth:`drain` (the woken thread) empties
    it, :meth:`close` closes both ends. Waking a pipe that is full (a wake-up is
    pending anyway) or not open (before start, after stop, in a forked child) does
    nothing; closing one that is closed does nothing.
    """

    def __init__(self) -> None:
        self._r = self._w = -1

    def fileno(self) -> int:
        """The end to wait on for reading (-1 while not open)."""
        return self._r

    def open(self) -> int:
        """Make the pipe (once; again after :meth:`close`); return :meth:`fileno`."""
        if self._r < 0:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._r, self._w = r, w
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass  # full (a wake-up is pending anyway), or not open

    def drain(self) -> None:
        try:
            while len(os.read(self._r, 4096)) == 4096:
                pass
        except OSError:
            pass  # empty, or not open

    def close(self) -> None:
        fds = (self._r, self._w)
        self._r = self._w = -1  # first: a wake from another thread now does nothing
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


class ForkParking:
    """Runs one background thread and parks it around every fork; see the module docstring.

    ``what`` names the thread in the warning ("hub", "bus bridge").
    ``after_parent`` and ``after_child`` are the owner's fork handlers, called in the
    forking thread; ``after_parent`` only while a thread runs, ``after_child`` always
    (it decides what there is to close), before :attr:`pipe` is closed there.
    """

    def __init__(self, what: str, after_parent: Callable[[], None] | None = None,
                 after_child: Callable[[], None] | None = None) -> None:
        self.what = what
        #: The thread's wake-up pipe: opened by :meth:`start` (or by the owner before,
        #: to wait on it), closed by :meth:`stop` and in a forked child.
        self.pipe = WakePipe()
        self._after_parent = after_parent
        self._after_child = after_child
        #: Set by the forking thread: the background thread must :meth:`park` now.
        self.requested = False
        self._parked = False
        self._active = False
        self._registered = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.log: Any = None

    def start(self, log: Any, run: Callable[[], None], name: str) -> None:
        """Start the thread (a daemon called ``name``, running ``run``), parked at every
        fork from now on.

        The fork handlers are registered once (they can't be removed); while no thread
        runs they only call ``after_child``. ``run`` must return soon after :meth:`stop`
        (its owner's flag says so) and call :meth:`park` whenever :attr:`requested`.
        """
        self.log = log
        self.pipe.open()
        self._active = True
        if not self._registered:
            self._registered = True
            os.register_at_fork(before=self._before, after_in_parent=self._parent,
                                after_in_child=self._child)
        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread: let it out of a park, wake it, wait for it (5 s at most),
        close the pipe; forks no longer wait for it. Its owner has told ``run`` to
        return first."""
        with self._cond:
            self._active = False
            self._cond.notify_all()
        self.pipe.wake()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self.pipe.close()

    @property
    def thread(self) -> threading.Thread | None:
        """The running thread (None before :meth:`start`, after :meth:`stop`, in a child)."""
        return self._thread

    def park(self) -> None:
        """In the background thread: wait here until the fork is over (parent side)."""
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            while self.requested and self._active:
                self._cond.wait()
            self._parked = False

    def _before(self) -> None:
        if not self._active:
            return
        with self._cond:
            self.requested = True
            self.pipe.wake()
            if not self._cond.wait_for(lambda: self._parked or not self._active,
                                       timeout=PARK_TIMEOUT):
                if self.log is not None:
                    self.log.warning("gunicorn-ext: %s thread did not pause before fork", self.what)

    def _parent(self) -> None:
        try:
            if self._active and self._after_parent is not None:
                self._after_parent()
        finally:
            with self._cond:
                self.requested = False
                self._cond.notify_all()

    def _child(self) -> None:
        # The parent's condition and flags mean nothing here: no thread was forked.
        self._active = False
        self.requested = self._parked = False
        self._cond = threading.Condition()
        self._thread = None
        try:
            if self._after_child is not None:
                self._after_child()
        finally:
            self.pipe.close()
