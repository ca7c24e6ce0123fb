"""Request deadlines (``request_timeout``): what uWSGI calls harakiri.

Gunicorn's ``timeout`` watches a worker's heartbeat, which a gthread worker's main
thread keeps sending while one of its request threads hangs forever (Gunicorn #2086).
Here every request carries a deadline. A watchdog thread in the worker checks the
requests in flight; one past its deadline:

1. has its thread's stack logged with the request line (one log record);
2. gets ``503`` with ``Retry-After`` when nothing of its response was sent yet (the
   app had not called ``start_response``), and its connection is shut down either way,
   so the client is not left waiting;
3. recycles the worker gracefully: it stops taking connections, its other requests
   finish, and the slot gets a fresh worker. A sync worker has no other request, so it
   is stopped at once (SIGQUIT, which unwinds the stuck Python code); a gthread worker
   exits as soon as its other requests are done, or after ``graceful_timeout``.

A hang inside C code that holds the GIL stops the watchdog too; ``faulthandler``,
re-armed by every tick of the watchdog, then dumps every thread's stack to stderr after
``request_timeout`` plus two seconds, and Gunicorn's own ``timeout`` ends the worker.

WebSocket upgrades are exempt: they hold their request for as long as they are open.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from . import gunicorn_internals as gi
from .sticky import ENVIRON_KEY, RouteCookie

_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
             b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 47\r\n\r\n"
             b"the request ran past its deadline (gunicorn-ext)")
#: How long the watchdog gives a stopped worker to go before it exits the process itself.
EXIT_GRACE = 2.0


#: One request in flight, as :meth:`Deadlines.wrap` stores it on every request: a list
#: (building one costs about half of making even a slotted instance with no
#: ``__init__``) of references only, read by these indexes; the request line for the log
#: is formatted only if the request expires (:func:`_line`). ``_GREENLET``: under gevent,
#: the request's greenlet (it has no thread of its own), else None.
_START, _METHOD, _PATH, _QUERY, _SOCK, _START_RESPONSE, _GREENLET, _EXPIRED = range(8)
_Request = list[Any]  # [start, method, path, query, sock, start_response, greenlet, expired]


def _line(r: _Request) -> str:
    query = r[_QUERY]
    return f"{r[_METHOD]} {r[_PATH]}{'?' + query if query else ''}"


def _responded(r: _Request) -> bool:
    """The app called ``start_response``: part of a response may be out (read from
    Gunicorn's response, :func:`gunicorn_internals.wsgi_responded`, rather than by
    wrapping ``start_response``, which cost a call on every request)."""
    return gi.wsgi_responded(r[_START_RESPONSE])


class Deadlines:
    """The deadlines of one worker's requests, and the watchdog that enforces them."""

    def __init__(self, timeout: float, worker: Any, recycle: Callable[[str], None],
                 cleanup: Callable[[], None], log: Any) -> None:
        self.timeout = timeout
        self.worker = worker
        self.recycle = recycle  # tell the primary why, then stop gracefully (SIGTERM)
        self.cleanup = cleanup  # what worker_exit would do, before the process ends
        self.log = log
        self.threaded = type(worker).__name__ != "SyncWorker"
        self.graceful_timeout = float(getattr(worker.cfg, "graceful_timeout", 30) or 30)
        #: Requests in flight by thread ident (by greenlet under gevent).
        self._inflight: dict[Any, _Request] = {}
        self._lock = threading.Lock()
        self._stopping_since: float | None = None
        self._thread: threading.Thread | None = None
        #: greenlet.getcurrent under gevent, whose requests are greenlets, not threads.
        self.green: Callable[[], Any] | None = None
        gevent_monkey = sys.modules.get("gevent.monkey")
        if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
            import greenlet  # type: ignore[import-untyped]

            self.green = greenlet.getcurrent

    # -- the WSGI side, on each request's thread

    def wrap(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        """*app* with its requests registered (removed in :meth:`finished`).

        A :class:`~gunicorn_ext.sticky.RouteCookie` *app* (the worker hooks pin the app
        before this wraps it) is folded in: its check for a client already pinned here
        runs inline, and such a request calls the app inside it directly, one Python
        call fewer on every request; any other request goes through the cookie."""

        # The request path takes no lock: one dict store here and one pop in finished(),
        # each atomic under the GIL; the watchdog copies the dict under its own lock.
        inflight = self._inflight
        green = self.green
        monotonic = time.monotonic
        get_ident = threading.get_ident
        # A sync worker runs every request on the thread that wraps its app (post_worker_init).
        main = None if self.threaded or green is not None else get_ident()
        cookie = app if isinstance(app, RouteCookie) else None
        inner = cookie.app if cookie is not None else app
        pinned = cookie.pinned if cookie is not None else None
        pinned_first = pinned + ";" if pinned is not None else ""

        def with_deadline(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if "HTTP_UPGRADE" in environ and environ["HTTP_UPGRADE"].lower() == "websocket":
                return app(environ, start_response)
            # As the request came in (middleware may rewrite PATH_INFO later). Gunicorn's
            # environ has all four: subscripts cost less than get() calls.
            try:
                r = [monotonic(), environ["REQUEST_METHOD"], environ["PATH_INFO"],
                     environ["QUERY_STRING"], environ["gunicorn.socket"], start_response,
                     None, False]
            except KeyError:
                r = [monotonic(), environ.get("REQUEST_METHOD", "?"), environ.get("PATH_INFO", ""),
                     environ.get("QUERY_STRING"), environ.get("gunicorn.socket"), start_response,
                     None, False]
            if green is not None:  # gevent: the greenlet is the key (its get_ident() is slower)
                r[_GREENLET] = g = green()
                inflight[g] = r
            else:
                inflight[main if main is not None else get_ident()] = r
            if pinned is not None:
                # RouteCookie.__call__ for a client pinned here (its first cookie is ours).
                environ[ENVIRON_KEY] = cookie
                if "HTTP_COOKIE" in environ:
                    header = environ["HTTP_COOKIE"]
                    if header == pinned or header.startswith(pinned_first):
                        return inner(environ, start_response)
            return app(environ, start_response)

        return with_deadline

    def finished(self) -> None:
        """``post_request``: the response is complete (body included)."""
        green = self.green
        self._inflight.pop(green() if green is not None else threading.get_ident(), None)

    # -- the watchdog

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gunicorn-ext-deadlines",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = max(0.05, min(1.0, self.timeout / 4))
        while True:
            time.sleep(interval)
            try:
                self.check(time.monotonic())
            except Exception:
                self.log.exception("gunicorn-ext: request deadline check failed")

    def check(self, now: float) -> None:
        with self._lock:
            live = [(ident, r) for ident, r in list(self._inflight.items()) if not r[_EXPIRED]]
            expired = [(ident, r) for ident, r in live if now - r[_START] > self.timeout]
            for _, r in expired:
                r[_EXPIRED] = True
            others = [r for _, r in live if not r[_EXPIRED]]
        if live:
            # A hang that holds the GIL stops this thread: faulthandler speaks then.
            faulthandler.dump_traceback_later(self.timeout + 2.0, exit=False)
        else:
            faulthandler.cancel_dump_traceback_later()
        for ident, r in expired:
            self._expire(ident, r, now)
        if self._stopping_since is not None:
            done = not others
            late = now - self._stopping_since > (self.graceful_timeout if self.threaded
                                                  else EXIT_GRACE)
            if done or late:
                self._exit()

    def _expire(self, ident: Any, r: _Request, now: float) -> None:
        green = r[_GREENLET]
        frame = green.gr_frame if green is not None else sys._current_frames().get(ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(thread gone)\n"
        self.log.critical(
            "gunicorn-ext: request deadline: %s ran %.1fs, over request_timeout=%ss, in worker "
            "pid %s; the worker is recycled. Its thread's stack:\n%s",
            _line(r), now - r[_START], _fmt(self.timeout), os.getpid(), stack)
        sock = r[_SOCK]
        if sock is not None:
            try:
                if not _responded(r):
                    sock.settimeout(1.0)
                    sock.sendall(_RESPONSE)
            except OSError:
                pass
            try:
                sock.shutdown(2)  # SHUT_RDWR: the client is answered or cut, never left hanging
            except OSError:
                pass
        if self._stopping_since is None:
            self._stopping_since = now
            self.recycle(f"request deadline: {_line(r)} ran over request_timeout={_fmt(self.timeout)}s")
            if not self.threaded:
                # The stuck request runs on the main thread: SIGQUIT's handler raises
                # SystemExit there, unwinding it.
                os.kill(os.getpid(), signal.SIGQUIT)

    def _exit(self) -> None:
        self.log.warning("gunicorn-ext: worker pid %s exits after its request deadline",
                         os.getpid())
        faulthandler.cancel_dump_traceback_later()
        try:
            self.cleanup()
        except Exception:
            self.log.exception("gunicorn-ext: cleanup before exit failed")
        os._exit(0)


def _fmt(seconds: float) -> str:
    return f"{seconds:g}"
