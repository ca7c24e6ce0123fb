"""The admin endpoint: the primary answers for the instance over HTTP, by itself.

With ``admin_bind="127.0.0.1:9191"`` the arbiter serves:

* ``GET /metrics``: the instance's Prometheus document, rendered by the primary;
* ``GET /status``: the ``gunicorn-ext status --json`` document;
* ``GET /livez``: 200 while the primary runs;
* ``GET /readyz``: 200 when every target slot has a ready worker and no rolling
  reload has failed, else 503 with the reasons, one per line.

None of it involves a worker, so it answers while every worker thread is busy or
hung, exactly when an operator needs it. ``HEAD`` works like ``GET``; any other
method gets 405, an unknown path 404, a malformed request 400 (or 431 for an
oversized head, 408 for a client that does not send one in time), each with one
log line. The endpoint is read-only.

One thread serves every connection from a selector loop: it reads a request head
without blocking, hands it to :class:`http.server.BaseHTTPRequestHandler` (over
in-memory files) for parsing and formatting, and writes the answer without
blocking, so a slow or silent client holds nobody up. Fork safety follows the
hub (and Gunicorn's ``ctl/`` server): the thread is parked before every fork the
arbiter makes and resumed in the parent; the child closes the listener and the
connections it inherited and never serves.
"""

from __future__ import annotations

import errno
import io
import json
import os
import selectors
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from .forksafe import ForkParking
from .gunicorn_internals import listeners
from .metrics import CONTENT_TYPE
from .settings import is_loopback

#: Paths served, each a GET (and HEAD).
ENDPOINTS = ("/metrics", "/status", "/livez", "/readyz")
#: Longest request head accepted (request line and headers), in bytes.
MAX_HEAD = 8 * 1024
#: Seconds a client gets to send its request head, then to take its answer.
CLIENT_TIMEOUT = 5.0
#: Connections served at once; more are closed at once.
MAX_CLIENTS = 64

_RECV_SIZE = 16 * 1024
_LINGER = 1.0  # seconds a client gets to close after its answer
_WAKE = object()
_LISTENER = object()


class AdminError(Exception):
    """The admin endpoint cannot start, with a message fit to log as is."""

    def __init__(self, message: str, in_use: bool = False) -> None:
        super().__init__(message)
        #: The address is taken (by another process, or the old master after USR2).
        self.in_use = in_use


def readiness(sup: Any, stopping: bool = False) -> list[str]:
    """Why the instance is not ready (empty: ready), from the supervisor's own state.

    A slot is served when a worker in it has reported ready and has not been
    replaced; during a rolling reload the old worker serves its slot until its
    replacement is ready. A failed rolling reload keeps the instance not ready
    until the next reload succeeds (the old workers still serve the app).
    ``stopping``: the arbiter has closed its listeners to shut down.
    """
    server = sup.server
    if server is None:
        return ["the arbiter is not running"]
    if stopping:
        return ["the primary is shutting down: its listeners are closed, workers are draining"]
    steps = dict(sup.rollout.steps)
    served: set[int] = set()
    booting: set[int] = set()
    for rec in sup.workers.live():
        slot = rec.slot
        if rec.retired:
            step = steps.get(slot)
            if not (step is not None and step.old is rec and not step.termed and rec.ready):
                continue
        if rec.ready:
            served.add(slot)
        else:
            booting.add(slot)
    missing = [slot for slot in range(server.num_workers) if slot not in served]
    reasons = []
    if missing:
        # Why, in the words of the status document (it knows back-off and the breaker).
        rows: dict[int, dict[str, Any]] = {}
        for row in sup.status().get("workers", []):
            if row.get("state") != "draining":
                rows.setdefault(row.get("slot"), row)
        for slot in missing:
            row = rows.get(slot, {})
            state = row.get("state")
            if slot in booting or state == "booting":
                why = "its worker is booting"
            elif state == "stopped":
                why = "its restart breaker is open"
            elif state == "backoff" and float(row.get("backoff") or 0) > 0:
                why = f"it is in restart back-off ({float(row['backoff']):.1f}s left)"
            elif state == "backoff":
                why = "its worker exited and is being replaced"
            else:
                why = "it has no worker"
            reasons.append(f"slot {slot} has no ready worker: {why}")
    if sup.rollout.state == "failed":
        reasons.append(f"the last rolling reload failed: {sup.rollout.message}")
    return reasons


class _Handler(BaseHTTPRequestHandler):
    """One request, parsed from and answered into memory (never a socket)."""

    server_version = "gunicorn-ext-admin"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # answer even garbage with a status line
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def __init__(self, admin: AdminServer, head: bytes, peer: str) -> None:
        # Not BaseRequestHandler.__init__: there is no socket to set up.
        self.admin = admin
        self.client_address = (peer, 0)
        self.rfile = io.BytesIO(head)
        self._out = io.BytesIO()
        self.wfile = self._out
        self.close_connection = True
        self.requestline = ""
        self.request_version = "HTTP/1.0"
        self.command = ""
        self._detail = ""

    def answer(self) -> bytes:
        """Parse the head, run the endpoint, return the whole response."""
        self.handle_one_request()
        out = self._out.getvalue()
        return out or self.refuse(HTTPStatus.BAD_REQUEST, "empty request line")

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code >= 500:  # http.server's 505 for "HTTP/2.0": still the client's mistake
            code, message = HTTPStatus.BAD_REQUEST, f"bad request: {message}"
        super().send_error(code, message, explain)

    def refuse(self, code: int, message: str) -> bytes:
        """A response for a request that could not even be read."""
        self.send_error(code, message)
        return self._out.getvalue()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        self.close_connection = True
        if self.command not in ("GET", "HEAD"):
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed; use GET\n",
                        extra={"Allow": "GET, HEAD"})
            return False
        return True

    def do_GET(self) -> None:
        try:
            self._route(urlsplit(self.path).path)
        except Exception as exc:  # a bug, not bad input: say so, keep serving
            self.admin.log.exception("gunicorn-ext: admin endpoint failed on %r", self.requestline)
            self._out.seek(0)
            self._out.truncate()
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}\n")

    do_HEAD = do_GET

    def _route(self, path: str) -> None:
        admin = self.admin
        if path == "/livez":
            self._reply(HTTPStatus.OK, f"ok: primary pid {os.getpid()}\n")
        elif path == "/readyz":
            reasons = readiness(admin.supervisor, stopping=admin.arbiter_stopping())
            if reasons:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n" + "".join(
                    f"- {r}\n" for r in reasons), quiet=True)
            else:
                self._reply(HTTPStatus.OK, f"ready: {admin.supervisor.server.num_workers} slot(s) "
                                           "served\n")
        elif path == "/metrics":
            self._reply(HTTPStatus.OK, admin.supervisor.metrics.render(), CONTENT_TYPE)
        elif path == "/status":
            body = json.dumps(admin.supervisor.status(), separators=(",", ":")) + "\n"
            self._reply(HTTPStatus.OK, body, "application/json")
        else:
            self._reply(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}; the admin endpoint "
                                              f"serves {', '.join(ENDPOINTS)}\n")

    def _reply(self, code: HTTPStatus, body: str | bytes, ctype: str = "text/plain; charset=utf-8",
               extra: dict[str, str] | None = None, quiet: bool = False) -> None:
        data = body.encode() if isinstance(body, str) else body
        if code >= 400 and not quiet:
            self._detail = data.decode(errors="replace").strip().splitlines()[0]
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # -- logging: one line per refused request, nothing for the rest

    def log_error(self, format: str, *args: Any) -> None:
        self._detail = str(args[1]) if format == "code %d, message %s" else format % args

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if isinstance(code, int) and 400 <= code < 500 and self._detail:
            self.admin.log.warning("gunicorn-ext: admin endpoint answered %s to %r from %s: %s",
                                   code, self.requestline[:200], self.client_address[0],
                                   self._detail)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Conn:
    __slots__ = ("sock", "peer", "buf", "out", "deadline")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.out: memoryview | None = None  # the response, once there is one
        self.deadline = time.monotonic() + CLIENT_TIMEOUT


class AdminServer:
    """The admin HTTP endpoint of one arbiter; see the module docstring.

    ``supervisor`` is the arbiter's :class:`~gunicorn_ext.supervisor.Supervisor`;
    ``log`` a logging-style object (Gunicorn's logger works).
    """

    def __init__(self, host: str, port: int, supervisor: Any, log: Any,
                 allow_remote: bool = False) -> None:
        self.host = host
        self.port = port
        self.supervisor = supervisor
        self.log = log
        self.allow_remote = allow_remote
        self._sock: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._conns: dict[int, _Conn] = {}
        self._running = False
        self._parking = ForkParking("admin endpoint", after_child=self._after_fork_child)
        self._retry_at = 0.0
        self._arbiter_listened = False

    def arbiter_stopping(self) -> bool:
        """True once the arbiter, having listened, closed its listeners (Arbiter.stop)."""
        server = self.supervisor.server
        if server is None:
            return False
        if listeners(server):
            self._arbiter_listened = True
            return False
        return self._arbiter_listened

    @property
    def listening(self) -> bool:
        """False while waiting to take the address over from an old master."""
        return self._sock is not None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) listened on (the configured one while waiting to take it over)."""
        if self._sock is None:
            return self.host, self.port
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    # ------------------------------------------------------------- lifecycle

    def start(self, take_over: int = 0) -> None:
        """Listen and start the thread; :class:`AdminError` says why it cannot.

        ``take_over``: the pid of an old master this one replaces (Gunicorn's USR2).
        While that process holds the address, the thread retries every second and
        takes the address over once it is free; until then this primary does not serve.
        """
        if self._running:
            return
        try:
            sock: socket.socket | None = self._listen()
        except AdminError as exc:
            if not (exc.in_use and take_over):
                raise
            self.log.warning("gunicorn-ext: admin_bind %s:%s is still held, by the old master "
                             "(pid %s) after USR2 presumably; serving it once it is free",
                             self.host, self.port, take_over)
            sock = None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._parking.pipe.open(), selectors.EVENT_READ, _WAKE)
        if sock is not None:
            self._serve_on(sock)
        self._running = True
        self._parking.start(self.log, self._run, "gunicorn-ext-admin")

    def _listen(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise AdminError(f"cannot resolve admin_bind host {self.host!r}: {exc}")
        family, _, _, _, addr = infos[0]
        if not self.allow_remote and not is_loopback(str(addr[0])):
            raise AdminError(f"admin_bind {self.host!r} resolves to {addr[0]}, not a loopback "
                             "address (set admin_allow_remote=True to allow it)")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise AdminError(f"cannot listen on admin_bind {self.host}:{self.port}: "
                             f"{exc.strerror or exc}", in_use=exc.errno == errno.EADDRINUSE)
        sock.setblocking(False)
        return sock

    def _serve_on(self, sock: socket.socket) -> None:
        assert self._sel is not None
        self._sock = sock
        self._sel.register(sock, selectors.EVENT_READ, _LISTENER)

    def _retry_listen(self) -> None:
        """USR2 take-over: try the address again (in the thread, once a second)."""
        self._retry_at = time.monotonic() + 1.0
        try:
            sock = self._listen()
        except AdminError:
            return
        self._serve_on(sock)
        self.log.info("gunicorn-ext: admin endpoint on http://%s:%s (taken over)", self.host, self.port)

    def close(self) -> None:
        """Stop the thread and close the listener and every connection."""
        if not self._running:
            return
        self._running = False
        self._parking.stop()  # closes the wake-up pipe
        self._close_fds()

    def _close_fds(self) -> None:
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _after_fork_child(self) -> None:
        """In a worker: the listener and connections are the primary's; close our copies
        (the parking closes the wake-up pipe)."""
        if not self._running:
            return
        self._running = False
        self._close_fds()

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        while self._running:
            if self._parking.requested:
                self._parking.park()
                continue
            self.arbiter_stopping()  # notes that the arbiter listened, once it has
            now = time.monotonic()
            if self._sock is None and now >= self._retry_at:
                self._retry_listen()
            timeout = min([c.deadline for c in self._conns.values()], default=now + 1.0) - now
            try:
                events = sel.select(max(0.0, min(timeout, 1.0)))
            except OSError:
                events = []
            for key, mask in events:
                try:
                    if key.data is _WAKE:
                        self._parking.pipe.drain()
                    elif key.data is _LISTENER:
                        self._accept()
                    elif mask & selectors.EVENT_READ:
                        self._read(key.data)
                    elif mask & selectors.EVENT_WRITE:
                        self._write(key.data)
                except Exception:  # a bug here must not end the endpoint
                    self.log.exception("gunicorn-ext: admin endpoint failed")
                    if isinstance(key.data, _Conn):
                        self._drop(key.data)
            now = time.monotonic()
            for conn in [c for c in self._conns.values() if c.deadline <= now]:
                if conn.out is None:
                    self._respond(conn, _Handler(self, b"", conn.peer).refuse(
                        HTTPStatus.REQUEST_TIMEOUT, f"no request head within {CLIENT_TIMEOUT:g} s"))
                    conn.deadline = now + CLIENT_TIMEOUT
                else:
                    self._drop(conn)

    def _accept(self) -> None:
        assert self._sock is not None and self._sel is not None
        while True:
            try:
                sock, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.warning("gunicorn-ext: admin endpoint accept failed: %s", exc)
                return
            if len(self._conns) >= MAX_CLIENTS:
                self.log.warning("gunicorn-ext: admin endpoint: connection from %s refused: %s "
                                 "already open", addr[0], MAX_CLIENTS)
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, str(addr[0]))
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        if conn.out is not None:
            return  # a body or a pipelined request: ignored, the connection closes after the answer
        conn.buf += data
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.buf.find(b"\n\n")
        if end < 0 or end > MAX_HEAD:
            if len(conn.buf) > MAX_HEAD:
                self._respond(conn, _Handler(self, b"", conn.peer).refuse(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"request head longer than {MAX_HEAD} bytes"))
            return
        head = bytes(conn.buf[: end + 4])
        self._respond(conn, _Handler(self, head, conn.peer).answer())

    def _respond(self, conn: _Conn, data: bytes) -> None:
        assert self._sel is not None
        conn.buf.clear()
        conn.out = memoryview(data)
        conn.deadline = time.monotonic() + CLIENT_TIMEOUT
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        out = conn.out
        if out is None:
            return
        try:
            sent = conn.sock.send(out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.out = out = out[sent:]
        if not out:
            # Half-close, then drain what the client still sends (a body we ignored)
            # until it closes: closing with unread data would reset the answer away.
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._drop(conn)
                return
            conn.deadline = time.monotonic() + _LINGER
            assert self._sel is not None
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock.fileno(), None) is None:
            return
        if self._sel is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()


__all__ = ["ENDPOINTS", "AdminError", "AdminServer", "readiness"]
