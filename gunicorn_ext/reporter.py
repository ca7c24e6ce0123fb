"""The worker's side of lifecycle management.

A small thread in every worker reports its counters to the primary every
``stats_interval`` and watches two recycling limits: the soft RSS limit and the
maximum lifetime (with per-worker jitter). Crossing either makes the worker
exit gracefully: Gunicorn's SIGTERM handling stops accepting, lets in-flight
requests finish, and the primary replaces the worker in the same slot. The soft
limit is also checked after requests, so a leaking request is caught when it ends,
never in the middle of another: after the first request to finish at least
``RSS_CHECK_GAP`` (50 ms) after the last check, so an idle worker's next request is
always checked and a busy one is checked 20 times a second, not on each of
thousands of requests. A check is one ``pread`` of ``/proc/self/statm`` on a
descriptor kept open (about 1.3 us of system time, against 12 us to open the file
each time).

The request hooks (:func:`gunicorn_ext.hooks._request_hooks`) and the ASGI middleware
(:mod:`gunicorn_ext.asgi`) count each request into :attr:`Reporter.stats` and call
:meth:`Reporter.after_request` themselves.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import traceback
from typing import Any

from .ipc.bus import Bus
from .ipc.errors import BusClosed, IPCError
from .metrics import WorkerStats
from .settings import Settings

#: Name of the stats message the primary handles.
STATS = "gunicorn_ext.stats"
#: Name of the message a worker sends when it decides to exit, with the reason.
EXITING = "gunicorn_ext.exiting"

_PAGE = os.sysconf("SC_PAGE_SIZE")
#: Seconds between two soft-limit checks after requests (the first request to end
#: later than this after the last check reads RSS).
RSS_CHECK_GAP = 0.05
_perf_counter = time.perf_counter


class _Statm:
    """``/proc/self/statm``, opened once per process and re-read with ``pread``.

    procfs regenerates the file on every read at offset 0, so one descriptor serves
    every check. A forked child drops its parent's descriptor (it names the parent's
    memory) and opens its own on first use.
    """

    def __init__(self) -> None:
        self.fd = -1
        self._lock = threading.Lock()  # only around the open: two threads, one descriptor

    def rss(self) -> int:
        fd = self.fd
        if fd < 0:
            with self._lock:
                if self.fd < 0:
                    self.fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
                fd = self.fd
        return int(os.pread(fd, 128, 0).split(None, 2)[1]) * _PAGE

    def after_fork(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1
        self._lock = threading.Lock()


_STATM = _Statm()
os.register_at_fork(after_in_child=_STATM.after_fork)


def current_rss() -> int:
    """Resident set size of this process in bytes (one ``pread`` of /proc/self/statm)."""
    try:
        return _STATM.rss()
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


class Reporter:
    """Counters, recycling limits and exit reasons of this worker."""

    def __init__(self, bus: Bus, settings: Settings, log: Any) -> None:
        self.bus = bus
        self.settings = settings
        self.log = log
        self.stats = WorkerStats()
        self.started = time.monotonic()
        jitter = random.uniform(0, settings.max_lifetime_jitter) if settings.max_lifetime else 0.0
        self.lifetime = settings.max_lifetime + jitter if settings.max_lifetime else 0.0
        self._exiting = False
        #: perf_counter() before which a finished request does not read RSS.
        self.next_rss_check = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        # Made here, after a gevent worker has monkey-patched threading (post_fork is before).
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gunicorn-ext-reporter", daemon=True)
        self._thread.start()

    # -- request hooks (run on the request's thread, greenlet or task)

    def request_finished(self, seconds: float, now: float | None = None) -> None:
        """Count a finished request, then check the soft memory limit (at most every
        ``RSS_CHECK_GAP``; *now* is the request's end on the ``perf_counter`` clock)."""
        self.stats.request_finished(seconds)
        if self.settings.memory_soft_limit and not self._exiting:
            if now is None:
                now = _perf_counter()
            if now >= self.next_rss_check:
                self.after_request(now)

    def after_request(self, now: float) -> None:
        """The soft memory limit after a request that ended at *now* (``perf_counter``)."""
        if now < self.next_rss_check:
            return
        self.next_rss_check = now + RSS_CHECK_GAP
        limit = self.settings.memory_soft_limit
        if limit and not self._exiting:
            try:
                rss = _STATM.rss()
            except (OSError, ValueError, IndexError):
                rss = current_rss()
            if rss > limit:
                self.recycle(f"RSS {rss >> 20} MiB is over memory_soft_limit {limit >> 20} MiB")

    def check_memory(self) -> None:
        """Recycle now if RSS is over the soft limit."""
        limit = self.settings.memory_soft_limit
        if limit and not self._exiting:
            rss = current_rss()
            if rss > limit:
                self.recycle(f"RSS {rss >> 20} MiB is over memory_soft_limit {limit >> 20} MiB")

    # -- the thread

    def _run(self) -> None:
        interval = min(self.settings.stats_interval, self.settings.memory_check_interval)
        next_stats = 0.0
        while not self._stop.wait(interval if next_stats else 0.0):
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + self.settings.stats_interval
                self.report()
            limit = self.settings.memory_soft_limit
            if limit and not self._exiting:
                rss = current_rss()
                if rss > limit:
                    self.recycle(f"RSS {rss >> 20} MiB is over memory_soft_limit {limit >> 20} MiB")
            if self.lifetime and not self._exiting and now - self.started > self.lifetime:
                self.recycle(f"it reached max_lifetime ({self.lifetime:.0f}s with jitter)")

    def report(self) -> None:
        try:
            snap = self.stats.snapshot()
            snap["pid"] = os.getpid()
            snap["rss"] = current_rss()
            self.bus.send(STATS, snap)
        except BusClosed:
            self._stop.set()  # the worker is on its way out
        except IPCError as exc:  # e.g. MessageTooLarge: this report is lost, not the next one
            self.log.error("gunicorn-ext: could not report worker stats: %s", exc)
        except Exception:
            self.log.exception("gunicorn-ext: could not report worker stats")

    def recycle(self, reason: str) -> None:
        """Exit gracefully (finish in-flight requests) so the slot gets a fresh worker."""
        if self._exiting:
            return
        self._exiting = True
        self.log.warning("gunicorn-ext: worker slot %s (pid %s) recycling: %s; finishing "
                         "in-flight requests, then exiting", self.bus.slot, os.getpid(), reason)
        self.tell_exit(f"recycled: {reason}", planned=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def tell_exit(self, reason: str, planned: bool, tb: str | None = None) -> None:
        """Tell the primary why this worker is about to exit (best effort)."""
        try:
            self.bus.send(EXITING, {"pid": os.getpid(), "reason": reason, "planned": planned,
                                    "traceback": tb})
            self.bus.flush()
        except Exception:
            pass

    def worker_exit(self, worker: Any) -> None:
        """Gunicorn's worker_exit hook, in the worker: final counters and the cause."""
        self._stop.set()
        self.report()
        exc = _exit_exception()
        if exc is not None and not self._exiting:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.tell_exit(f"{type(exc).__name__}: {exc}", planned=False, tb=tb)
        self.bus.flush()


def _exit_exception() -> BaseException | None:
    """The exception that is ending this worker, if any (not the SystemExit wrapping it)."""
    import sys

    exc = sys.exc_info()[1]
    while isinstance(exc, SystemExit):
        if exc.code in (0, None):
            return None
        exc = exc.__context__  # type: ignore[assignment]
    return exc
