"""The control socket: how ``gunicorn-ext status``, ``reload`` and ``scale`` reach a primary.

Gunicorn's own control socket (gunicornc) has no extension point, so each
gunicorn-ext primary listens on a socket of its own, ``<runtime_dir>/<pid>.sock``.
Only the instance's user (and root) may talk to it: the directory is private
(0700, checked with lstat so a planted symlink or a directory someone else owns is
refused), the socket file is 0600, and every connection's peer credentials are
checked on accept.

The protocol is one JSON object per line each way. A request is
``{"cmd": str, "args": {...}}``; the response is whatever the primary's dispatch
function returned, or ``{"error": "..."}``. A client may send several requests on
one connection; they are answered in order.

The server owns no thread. The primary's event loop (the hub's epoll thread)
drives it through the ``watch``/``unwatch`` callbacks it is given, so commands run
in the same thread as everything else the primary does and need no locking.
Responses are small and written with a short blocking send; a client that does
not read its response is dropped rather than allowed to stall the loop.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Longest request line the server accepts, in bytes (without the newline).
MAX_REQUEST = 64 * 1024
#: Longest response line a client accepts (a status of many workers is still far below).
MAX_RESPONSE = 16 * 1024 * 1024
#: Seconds a client gets to take its response before it is dropped.
SEND_TIMEOUT = 2.0
#: Connections served at once; more are answered with an error and closed.
MAX_CLIENTS = 64
#: Where the private directory goes when XDG_RUNTIME_DIR is not set.
FALLBACK_BASE = Path("/tmp")

_RECV_SIZE = 64 * 1024
_PROBE_TIMEOUT = 1.0

Dispatch = Callable[[str, dict[str, Any]], dict[str, Any]]
Watch = Callable[[int, Callable[[], None]], None]
Unwatch = Callable[[int], None]


class ControlError(Exception):
    """A control socket problem, with a message fit to show the user as is."""


class UnknownCommand(ControlError):
    """Raised by a dispatch function for a command it does not know."""

    def __init__(self, cmd: str) -> None:
        super().__init__(f"unknown command {cmd!r}")
        self.cmd = cmd


# ----------------------------------------------------------------- locations


def runtime_dir(*, create: bool = True) -> Path:
    """The private directory holding this user's control sockets.

    ``$XDG_RUNTIME_DIR/gunicorn-ext`` when XDG_RUNTIME_DIR is set (and absolute,
    as the XDG spec requires), else ``/tmp/gunicorn-ext-<uid>``. It is created
    0700 when missing (unless ``create`` is false: clients only look). An existing
    one is used only if it is a real directory (never a symlink), owned by the
    current uid, and closed to group and others; otherwise :class:`ControlError`
    says what is wrong, because anyone who can write there could impersonate a
    primary or hide one.
    """
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        path = Path(xdg) / "gunicorn-ext"
    else:
        path = FALLBACK_BASE / f"gunicorn-ext-{uid}"
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlError(f"cannot create the control directory {path}: {exc.strerror or exc}")
        else:
            # mkdir's mode went through the umask; set it exactly, without following links.
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError as exc:
                raise ControlError(f"cannot open the control directory {path}: {exc.strerror or exc}")
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise ControlError(f"the control directory {path} vanished while being created")
        return path
    except OSError as exc:
        raise ControlError(f"cannot inspect the control directory {path}: {exc.strerror or exc}")
    if stat.S_ISLNK(st.st_mode):
        raise ControlError(
            f"refusing to use the control directory {path}: it is a symlink "
            "(remove it if you did not create it)")
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"refusing to use the control directory {path}: it is not a directory")
    if st.st_uid != uid:
        raise ControlError(
            f"refusing to use the control directory {path}: it is owned by uid {st.st_uid}, "
            f"not by you (uid {uid})")
    if st.st_mode & 0o077:
        raise ControlError(
            f"refusing to use the control directory {path}: its mode is "
            f"{stat.S_IMODE(st.st_mode):04o}, open to group or others (chmod 700 it or remove it)")
    return path


def socket_path(pid: int | None = None) -> Path:
    """The control socket of the primary ``pid`` (default: this process)."""
    return runtime_dir() / f"{os.getpid() if pid is None else pid}.sock"


# -------------------------------------------------------------------- server


class _Client:
    __slots__ = ("sock", "fd", "pid", "buf", "skipping", "closed")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid = pid
        self.buf = bytearray()
        #: Inside an oversized line: discard up to its newline.
        self.skipping = False
        self.closed = False


class ControlServer:
    """A unix socket serving JSON-line commands, driven by someone else's event loop.

    ``dispatch(cmd, args)`` runs each command and returns a JSON-encodable dict.
    It may raise :class:`ControlError` (such as :class:`UnknownCommand`) to answer
    ``{"error": str(exc)}``; any other exception is logged with its traceback and
    answered as an error too. ``watch(fd, callback)`` must make the loop call
    ``callback()`` whenever ``fd`` is readable, ``unwatch(fd)`` must stop that;
    both are called from :meth:`start` and :meth:`close` and from within the
    callbacks. ``log`` is a logging-style object (Gunicorn's logger works).
    """

    def __init__(self, path: Path, dispatch: Dispatch, log: Any, watch: Watch,
                 unwatch: Unwatch) -> None:
        self.path = Path(path)
        self.log = log
        self._dispatch = dispatch
        self._watch = watch
        self._unwatch = unwatch
        self._sock: socket.socket | None = None
        self._ident: tuple[int, int] | None = None
        self._clients: dict[int, _Client] = {}

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bind and listen (non-blocking), and ask the loop to watch the listener.

        A leftover socket file nobody listens on is replaced; a live one, or
        a path that is not a socket, raises :class:`ControlError`.
        """
        if self._sock is not None:
            raise ControlError(f"the control server on {self.path} is already started")
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The umask makes the file 0600 from the moment it exists (a chmod after
        # bind would leave a window); it is process-wide, so restore it at once.
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}")
        finally:
            os.umask(old)
        st = os.lstat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self._watch(sock.fileno(), self._on_listener)

    def fileno(self) -> int:
        """The listening socket's fd (-1 before :meth:`start` and after :meth:`close`)."""
        return self._sock.fileno() if self._sock is not None else -1

    def close(self) -> None:
        """Close every connection and the listener; remove the socket file if it is still ours."""
        for client in list(self._clients.values()):
            self._drop(client, None)
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._unwatch(sock.fileno())
        sock.close()
        ident, self._ident = self._ident, None
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == ident:  # not a newer instance's socket
            try:
                os.unlink(self.path)
            except OSError as exc:
                self.log.warning("gunicorn-ext: cannot remove control socket %s: %s", self.path, exc)

    def after_fork_child(self) -> None:
        """In a process forked from the primary: close the inherited sockets.

        Neither the loop (the child's copy is not running) nor the socket file
        (it is still the primary's) is touched.
        """
        for client in self._clients.values():
            client.closed = True
            client.sock.close()
        self._clients.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ident = None

    def _clear_stale(self) -> None:
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(f"cannot inspect {path}: {exc.strerror or exc}")
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"cannot listen on {path}: it exists and is not a socket")
        if _probe(path) == "live":
            raise ControlError(f"cannot listen on {path}: another process is already serving it")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ControlError(f"cannot remove the stale control socket {path}: {exc.strerror or exc}")

    # ---------------------------------------------------------------- events

    def _on_listener(self) -> None:
        """Accept every pending connection whose peer is our user or root."""
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self.log.error("gunicorn-ext: control socket accept failed: %s", exc)
                return
            try:
                pid, uid = _peer(conn)
            except OSError as exc:
                self.log.warning("gunicorn-ext: control connection closed: no peer credentials (%s)", exc)
                conn.close()
                continue
            if uid != os.getuid() and uid != 0:
                self.log.warning(
                    "gunicorn-ext: control connection from pid %s refused: uid %s is neither "
                    "this instance's user (uid %s) nor root", pid, uid, os.getuid())
                conn.close()
                continue
            client = _Client(conn, pid)
            if len(self._clients) >= MAX_CLIENTS:
                self.log.warning("gunicorn-ext: control connection from pid %s refused: %s "
                                 "connections already open", pid, MAX_CLIENTS)
                self._send(client, _encode({"error": "too many control connections; try again"}))
                conn.close()
                continue
            conn.setblocking(False)
            self._clients[client.fd] = client
            self._watch(client.fd, functools.partial(self._on_client, client))

    def _on_client(self, client: _Client) -> None:
        """Read what a client sent and answer every complete line."""
        if client.closed:
            return
        try:
            data = client.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, None if isinstance(exc, ConnectionResetError) else f"read failed: {exc}")
            return
        if not data:
            self._drop(client, None)
            return
        buf = client.buf
        buf += data
        try:
            while not client.closed:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_REQUEST:
                        if not client.skipping:
                            client.skipping = True
                            self._send(client, _encode(_oversized()))
                        buf.clear()
                    return
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if client.skipping:  # the end of a line already answered as oversized
                    client.skipping = False
                elif len(line) > MAX_REQUEST:
                    self._send(client, _encode(_oversized()))
                else:
                    self._send(client, self._handle(line))
        except Exception:  # a bug here must not reach the primary's loop
            self.log.exception("gunicorn-ext: control connection failed")
            self._drop(client, None)

    def _handle(self, line: bytes) -> bytes:
        """Run one request line; return the encoded response line."""
        if not line.strip():
            return _encode({"error": 'empty request; send {"cmd": "...", "args": {...}}'})
        try:
            req = json.loads(line)
        except ValueError as exc:
            return _encode({"error": f"bad request: not valid JSON ({exc})"})
        cmd = req.get("cmd") if isinstance(req, dict) else None
        if not isinstance(cmd, str) or not cmd:
            return _encode({"error": 'bad request: expected {"cmd": "...", "args": {...}}'})
        args = req.get("args")
        if args is None:
            args = {}
        elif not isinstance(args, dict):
            return _encode({"error": f"bad request: args of {cmd!r} must be an object"})
        try:
            resp = self._dispatch(cmd, args)
        except ControlError as exc:
            return _encode({"error": str(exc)})
        except Exception as exc:
            self.log.exception("gunicorn-ext: control command %r failed", cmd)
            return _encode({"error": f"command {cmd!r} failed: {type(exc).__name__}: {exc}"})
        if not isinstance(resp, dict):
            self.log.error("gunicorn-ext: control command %r returned %s, not a dict", cmd,
                           type(resp).__name__)
            return _encode({"error": f"command {cmd!r} returned no valid response"})
        try:
            return _encode(resp)
        except (TypeError, ValueError) as exc:
            self.log.error("gunicorn-ext: control command %r: response not JSON-encodable: %s", cmd, exc)
            return _encode({"error": f"command {cmd!r} returned no valid response"})

    def _send(self, client: _Client, data: bytes) -> None:
        """Write a response with a short blocking send; drop a client that does not read."""
        if client.closed:
            return
        sock = client.sock
        try:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendall(data, socket.MSG_NOSIGNAL)
            sock.setblocking(False)
        except TimeoutError:
            self._drop(client, f"it did not read its response within {SEND_TIMEOUT:g} s")
        except OSError as exc:
            lost = isinstance(exc, (BrokenPipeError, ConnectionResetError))
            self._drop(client, None if lost else f"write failed: {exc}")

    def _drop(self, client: _Client, reason: str | None) -> None:
        if client.closed:
            return
        client.closed = True
        if self._clients.pop(client.fd, None) is not None:
            self._unwatch(client.fd)
        client.sock.close()
        if reason is not None:
            self.log.warning("gunicorn-ext: closed control connection of pid %s: %s", client.pid, reason)


def _oversized() -> dict[str, Any]:
    return {"error": f"request line longer than {MAX_REQUEST} bytes"}


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of a unix socket's peer, as the kernel recorded them at connect."""
    fmt = "iII"  # struct ucred: pid_t, uid_t, gid_t
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, _gid = struct.unpack(fmt, raw)
    return pid, uid


# -------------------------------------------------------------------- client


def _probe(path: Path) -> str:
    """"live" (something accepts connections), "refused" (nothing listens) or "silent"."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(_PROBE_TIMEOUT)
    try:
        sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return "refused"
    except OSError:
        return "silent"
    finally:
        sock.close()
    return "live"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie not yet reaped does; EPERM: it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def find_socket(explicit: str | None = None) -> Path:
    """The control socket to talk to: ``explicit`` if given, else the only live one.

    Sockets left by primaries that died are removed on the way. No live socket,
    or several, raise :class:`ControlError` with a message saying what to do.
    """
    if explicit:
        return Path(explicit).expanduser()
    directory = runtime_dir(create=False)
    try:
        candidates = sorted(directory.glob("*.sock"))
    except OSError:
        candidates = []
    live: list[Path] = []
    silent: list[Path] = []
    for path in candidates:
        if _probe(path) == "live":
            live.append(path)
            continue
        pid = int(path.stem) if path.stem.isdigit() else None
        if pid is not None and not pid_alive(pid):
            try:
                path.unlink()
            except OSError:
                pass
        else:
            silent.append(path)
    if len(live) == 1:
        return live[0]
    if not live:
        msg = (f"no gunicorn-ext instance of user {_user_name(os.getuid())} is running "
               f"(looked in {directory})")
        if silent:
            msg += "; these control sockets did not answer: " + ", ".join(map(str, silent))
        raise ControlError(msg)
    listing = ", ".join(f"{p.stem} {p}" for p in live)
    raise ControlError(f"{len(live)} instances are running: {listing}; pick one with --socket PATH")


def call(path: Path, cmd: str, args: dict[str, Any] | None = None,
         timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the primary at ``path`` and return its response dict.

    An ``{"error": ...}`` response is returned as is (the caller decides how to
    report it); failing to connect, a timeout, or a garbled answer raise
    :class:`ControlError`.
    """
    deadline = time.monotonic() + timeout
    request = json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path} (is the instance running?)")
        except ConnectionRefusedError:
            raise ControlError(f"nothing is listening on {path} (the instance has exited; "
                               "the file is stale)")
        except PermissionError:
            raise ControlError(f"permission denied on {path} (it belongs to another user)")
        except TimeoutError:
            raise ControlError(f"the instance at {path} did not accept a connection "
                               f"within {timeout:g} s (is it hung?)")
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}")
        buf = bytearray()
        try:
            sock.sendall(request)
            while b"\n" not in buf:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(_RECV_SIZE)
                if not chunk:
                    raise ControlError(f"the instance at {path} closed the connection without "
                                       f"answering {cmd!r}")
                buf += chunk
                if len(buf) > MAX_RESPONSE:
                    raise ControlError(f"the answer to {cmd!r} from {path} is too long")
        except TimeoutError:
            raise ControlError(f"the instance at {path} did not answer {cmd!r} within {timeout:g} s")
        except ControlError:
            raise
        except OSError as exc:
            raise ControlError(f"connection to {path} lost while asking {cmd!r}: {exc.strerror or exc}")
    line = bytes(buf[: buf.index(b"\n")])
    try:
        resp = json.loads(line)
    except ValueError:
        resp = None
    if not isinstance(resp, dict):
        raise ControlError(f"the instance at {path} sent a garbled answer to {cmd!r}")
    return resp


__all__ = [
    "ControlError",
    "ControlServer",
    "UnknownCommand",
    "call",
    "find_socket",
    "pid_alive",
    "runtime_dir",
    "socket_path",
]
