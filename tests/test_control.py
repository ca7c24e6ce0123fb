"""The control socket (gunicorn_ext.control) and the gunicorn-ext command (gunicorn_ext.cli).

A ControlServer owns no thread, so these tests drive it with a tiny selectors
loop in a background thread, standing in for the primary's epoll loop.
"""

from __future__ import annotations

import copy
import json
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from logs import RecordingLog

from gunicorn_ext import cli
from gunicorn_ext.control import (
    MAX_REQUEST,
    ControlError,
    ControlServer,
    UnknownCommand,
    call,
    find_socket,
    runtime_dir,
    socket_path,
)


class Loop:
    """A minimal event loop in a thread: what the hub's epoll thread is to the server."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.sel.register(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int) -> None:
        self.sel.unregister(fd)

    def _run(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.sel.select(0.02):
                try:
                    key.data()
                except BaseException as exc:  # surfaced by the fixture
                    self.errors.append(exc)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)


def echo_dispatch(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    if cmd == "echo":
        return {"echo": args}
    if cmd == "boom":
        raise RuntimeError("kaput")
    if cmd == "refuse":
        raise ControlError("not now")
    if cmd == "notadict":
        return [1, 2]  # type: ignore[return-value]
    raise UnknownCommand(cmd)


@pytest.fixture
def rundir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_RUNTIME_DIR pointed at tmp_path; returns the control directory path."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "gunicorn-ext"


Serve = Callable[..., tuple[ControlServer, RecordingLog]]


@pytest.fixture
def serve(rundir: Path) -> Iterator[Serve]:
    """``serve(dispatch=echo_dispatch, path=None) -> (server, log)``, each on its own loop."""
    running: list[tuple[ControlServer, Loop]] = []

    def start(dispatch: Callable[..., dict[str, Any]] = echo_dispatch,
              path: Path | None = None) -> tuple[ControlServer, RecordingLog]:
        log = RecordingLog()
        loop = Loop()
        server = ControlServer(path or socket_path(), dispatch, log, loop.watch, loop.unwatch)
        server.start()
        loop.thread.start()
        running.append((server, loop))
        return server, log

    yield start
    for server, loop in running:
        loop.stop()
        server.close()  # unwatches through the (stopped) loop's selector
        loop.sel.close()
        assert not loop.errors, loop.errors


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def read_line(sock: socket.socket, buf: bytearray) -> dict[str, Any]:
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "server closed the connection"
        buf += chunk
    nl = buf.index(b"\n")
    line = bytes(buf[:nl])
    del buf[: nl + 1]
    result: dict[str, Any] = json.loads(line)
    return result


# --------------------------------------------------------------- runtime dir


def test_runtime_dir_and_socket_are_private(serve: Serve, rundir: Path) -> None:
    old = os.umask(0o022)
    try:
        server, _ = serve()
    except BaseException:
        os.umask(old)
        raise
    assert runtime_dir() == rundir
    assert stat.S_IMODE(os.lstat(rundir).st_mode) == 0o700
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert server.path == rundir / f"{os.getpid()}.sock"
    current = os.umask(old)
    assert current == 0o022  # restored after bind


def test_runtime_dir_is_created_0700_despite_umask(rundir: Path) -> None:
    old = os.umask(0o277)
    try:
        path = runtime_dir()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o770, 0o705, 0o711, 0o720])
def test_runtime_dir_open_to_others_is_refused(rundir: Path, mode: int) -> None:
    rundir.mkdir()
    os.chmod(rundir, mode)
    with pytest.raises(ControlError, match="open to group or others"):
        runtime_dir()
    with pytest.raises(ControlError):
        find_socket()


def test_runtime_dir_symlink_is_refused(rundir: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    rundir.symlink_to(target)
    with pytest.raises(ControlError, match="symlink"):
        runtime_dir()


def test_runtime_dir_that_is_a_file_is_refused(rundir: Path) -> None:
    rundir.write_text("")
    with pytest.raises(ControlError, match="not a directory"):
        runtime_dir()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_runtime_dir_owned_by_someone_else_is_refused(rundir: Path) -> None:
    rundir.mkdir(mode=0o700)
    os.chown(rundir, 65534, 65534)
    with pytest.raises(ControlError, match="owned by uid 65534"):
        runtime_dir()


def test_runtime_dir_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gunicorn_ext import control

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(control, "FALLBACK_BASE", tmp_path)
    assert runtime_dir() == tmp_path / f"gunicorn-ext-{os.getuid()}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # not absolute: ignored, per the spec
    assert runtime_dir() == tmp_path / f"gunicorn-ext-{os.getuid()}"


# -------------------------------------------------------------------- server


def test_requests_on_one_connection(serve: Serve) -> None:
    server, _ = serve()
    with connect(server.path) as s:
        buf = bytearray()
        s.sendall(b'{"cmd": "echo", "args": {"a": 1}}\n')
        assert read_line(s, buf) == {"echo": {"a": 1}}
        # Pipelined in one write, and one split across writes: answered in order.
        s.sendall(b'{"cmd": "echo", "args": {"n": 1}}\n{"cmd": "echo"}\n{"cmd": "ec')
        assert read_line(s, buf) == {"echo": {"n": 1}}
        assert read_line(s, buf) == {"echo": {}}
        s.sendall(b'ho", "args": {"n": 3}}\n')
        assert read_line(s, buf) == {"echo": {"n": 3}}


def test_bad_requests_get_errors_and_the_server_keeps_serving(serve: Serve) -> None:
    server, log = serve()
    with connect(server.path) as s:
        buf = bytearray()
        for line, match in [
            (b"this is not json\n", "not valid JSON"),
            (b"[1, 2]\n", "expected"),
            (b'{"args": {}}\n', "expected"),
            (b'{"cmd": "echo", "args": [1]}\n', "must be an object"),
            (b'{"cmd": "nope"}\n', "unknown command 'nope'"),
            (b'{"cmd": "refuse"}\n', "not now"),
            (b'{"cmd": "notadict"}\n', "no valid response"),
            (b"\xff\xfe\n", "not valid JSON"),
        ]:
            s.sendall(line)
            resp = read_line(s, buf)
            assert set(resp) == {"error"} and match in resp["error"], (line, resp)
        s.sendall(b'{"cmd": "echo", "args": {"still": "here"}}\n')
        assert read_line(s, buf) == {"echo": {"still": "here"}}
    assert not log.at("exception")


def test_dispatch_exception_is_logged_and_answered(serve: Serve) -> None:
    server, log = serve()
    assert call(server.path, "boom") == {"error": "command 'boom' failed: RuntimeError: kaput"}
    assert call(server.path, "echo", {"x": 1}) == {"echo": {"x": 1}}
    assert log.at("exception") == ["gunicorn-ext: control command 'boom' failed"]


@pytest.mark.parametrize("with_newline", [True, False])
def test_oversized_line(serve: Serve, with_newline: bool) -> None:
    server, _ = serve()
    big = b'{"cmd": "echo", "args": {"x": "' + b"x" * (MAX_REQUEST + 10) + b'"}}'
    with connect(server.path) as s:
        buf = bytearray()
        if with_newline:
            s.sendall(big + b'\n{"cmd": "echo", "args": {"after": 1}}\n')
        else:  # the error comes before the line ends; the rest of it is skipped
            s.sendall(big)
            resp = read_line(s, buf)
            assert "longer than" in resp["error"]
            s.sendall(b'"more of it"\n{"cmd": "echo", "args": {"after": 1}}\n')
        if with_newline:
            assert "longer than" in read_line(s, buf)["error"]
        assert read_line(s, buf) == {"echo": {"after": 1}}
    # A line of exactly the limit is fine.
    pad = MAX_REQUEST - len(b'{"cmd": "echo", "args": {"x": ""}}')
    exact = b'{"cmd": "echo", "args": {"x": "' + b"y" * pad + b'"}}'
    assert len(exact) == MAX_REQUEST
    with connect(server.path) as s:
        s.sendall(exact + b"\n")
        assert read_line(s, bytearray())["echo"]["x"] == "y" * pad


def test_clients_are_independent(serve: Serve) -> None:
    server, _ = serve()
    a, b = connect(server.path), connect(server.path)
    with a, b:
        a.sendall(b'{"cmd": "echo", "args": {"who": "a", "partial"')  # a stays half-written
        b.sendall(b'{"cmd": "echo", "args": {"who": "b"}}\n')
        assert read_line(b, bytearray()) == {"echo": {"who": "b"}}
        a.sendall(b': 1}}\n')
        assert read_line(a, bytearray()) == {"echo": {"who": "a", "partial": 1}}


def test_close_unlinks_only_its_own_socket(serve: Serve, rundir: Path) -> None:
    log = RecordingLog()
    loop = Loop()
    path = rundir.parent / "a.sock"
    server = ControlServer(path, echo_dispatch, log, loop.watch, loop.unwatch)
    server.start()
    assert server.fileno() >= 0
    server.close()
    assert not path.exists() and server.fileno() == -1
    server.close()  # idempotent

    server.start()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))  # someone else's socket now sits at the path
    server.close()
    assert path.exists()
    other.close()
    loop.sel.close()


def test_start_replaces_stale_socket_and_refuses_live_one(serve: Serve, rundir: Path) -> None:
    runtime_dir()
    path = socket_path()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    server, _ = serve()
    assert call(server.path, "echo") == {"echo": {}}
    loop = Loop()
    second = ControlServer(path, echo_dispatch, RecordingLog(), loop.watch, loop.unwatch)
    with pytest.raises(ControlError, match="already serving"):
        second.start()
    notsock = rundir / "plain.sock"
    notsock.write_text("")
    third = ControlServer(notsock, echo_dispatch, RecordingLog(), loop.watch, loop.unwatch)
    with pytest.raises(ControlError, match="not a socket"):
        third.start()
    loop.sel.close()


def test_same_uid_peer_is_accepted(serve: Serve) -> None:
    server, log = serve()
    assert call(server.path, "echo", {"ok": True}) == {"echo": {"ok": True}}
    assert not log.at("warning")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_other_uid_peer_is_refused(serve: Serve) -> None:
    # The socket must be reachable by uid 65534 for the kernel to let it connect,
    # so it lives in a world-traversable directory and is opened up to 0666 here:
    # only the peer-credential check stands between that user and the primary.
    public = Path(tempfile.mkdtemp(prefix="gx-ctl-", dir="/tmp"))
    try:
        os.chmod(public, 0o755)
        server, log = serve(path=public / "ctl.sock")
        os.chmod(server.path, 0o666)
        pid = os.fork()
        if pid == 0:  # child: become nobody, then try the socket
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect(str(server.path))
                try:
                    s.sendall(b'{"cmd": "echo"}\n')
                    code = 0 if s.recv(100) == b"" else 1
                except (BrokenPipeError, ConnectionResetError):  # closed before we wrote
                    code = 0
            except BaseException as exc:
                os.write(2, f"child: {exc!r}\n".encode())
                code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        deadline = time.monotonic() + 5
        while not log.at("warning") and time.monotonic() < deadline:
            time.sleep(0.01)
        (warning,) = log.at("warning")
        assert "uid 65534" in warning and "refused" in warning
        assert call(server.path, "echo") == {"echo": {}}  # still serving its own user
    finally:
        shutil.rmtree(public, ignore_errors=True)


# -------------------------------------------------------------------- client


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_find_socket_none(rundir: Path) -> None:
    with pytest.raises(ControlError) as info:
        find_socket()
    msg = str(info.value)
    assert "no gunicorn-ext instance of user" in msg and "is running" in msg
    assert str(rundir) in msg


def test_find_socket_one_and_stale_cleanup(serve: Serve, rundir: Path) -> None:
    server, _ = serve()
    stale_path = rundir / f"{dead_pid()}.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(stale_path))
    stale.close()
    assert find_socket() == server.path
    assert not stale_path.exists()
    assert find_socket("/some/where.sock") == Path("/some/where.sock")


def test_find_socket_several(serve: Serve, rundir: Path) -> None:
    a, _ = serve()
    b, _ = serve(path=rundir / "4242.sock")
    with pytest.raises(ControlError) as info:
        find_socket()
    msg = str(info.value)
    assert msg.startswith("2 instances are running: ")
    assert f"{os.getpid()} {a.path}" in msg and f"4242 {b.path}" in msg
    assert msg.endswith("pick one with --socket PATH")


def test_find_socket_keeps_unanswering_socket_of_live_pid(rundir: Path) -> None:
    runtime_dir()
    path = rundir / f"{os.getpid()}.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    with pytest.raises(ControlError, match="did not answer"):
        find_socket()
    assert path.exists()  # its pid lives: not ours to judge


def test_call_errors(tmp_path: Path, serve: Serve) -> None:
    with pytest.raises(ControlError, match="no control socket at"):
        call(tmp_path / "missing.sock", "status")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(ControlError, match="nothing is listening"):
        call(stale, "status")

    def slow(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.5)
        return {}

    server, _ = serve(dispatch=slow, path=tmp_path / "slow.sock")
    with pytest.raises(ControlError, match="did not answer 'status' within 0.1 s"):
        call(server.path, "status", timeout=0.1)


# ----------------------------------------------------------------------- cli

STATUS: dict[str, Any] = {
    "instance": "web-1:8000",
    "primary_pid": 4100,
    "uptime": 3725.0,
    "workers_target": 3,
    "workers": [
        {"slot": 1, "pid": 4102, "state": "ready", "uptime": 62.0, "requests": 1200,
         "inflight": 2, "rss": 12_900_000, "cpu": 3.25, "restarts": 1,
         "last_exit": "rss limit (soft)"},
        {"slot": 0, "pid": 4101, "state": "ready", "uptime": 3720.0, "requests": 34000,
         "inflight": 0, "rss": 48_000_000, "cpu": 12.5, "restarts": 0, "last_exit": None},
        {"slot": 2, "pid": 0, "state": "backoff", "uptime": 0.0, "requests": 7,
         "inflight": 0, "rss": 0, "cpu": 0.0, "restarts": 5, "last_exit": "exit code 3"},
    ],
    "totals": {"requests": 35207, "inflight": 2, "rss": 60_900_000, "restarts": 6},
    "rollout": {"state": "idle", "batch": 0, "done": 0, "total": 0, "message": ""},
}


class FakePrimary:
    """A dispatch standing in for the primary: canned status, scripted rollouts."""

    def __init__(self, rollout_steps: list[dict[str, Any]] | None = None) -> None:
        self.status = copy.deepcopy(STATUS)
        self.steps = list(rollout_steps or [])
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((cmd, args))
        if cmd == "status":
            if self.steps:
                self.status["rollout"] = self.steps.pop(0)
            return self.status
        if cmd == "reload":
            if not self.steps:
                return {"error": "nothing to reload"}
            self.status["rollout"] = self.steps.pop(0)
            return {"ok": True, "rollout": self.status["rollout"]}
        if cmd == "scale":
            previous = self.status["workers_target"]
            self.status["workers_target"] = args["workers"]
            return {"ok": True, "workers_target": args["workers"], "previous": previous}
        raise UnknownCommand(cmd)


def rollout(state: str, done: int, total: int = 4, message: str = "") -> dict[str, Any]:
    return {"state": state, "batch": 2, "done": done, "total": total, "message": message}


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "POLL_INTERVAL", 0.01)


def test_cli_status_table(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    serve(dispatch=FakePrimary())
    assert cli.main(["status"]) == 0  # finds the only instance by itself
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "instance web-1:8000  primary 4100  up 1h02m  workers 2/3"
    assert out[1] == ""
    assert out[2].split() == ["SLOT", "PID", "STATE", "UPTIME", "REQS", "INFLIGHT", "RSS", "CPU%",
                              "RESTARTS", "LAST", "EXIT"]
    assert out[3].split() == ["0", "4101", "ready", "1h02m", "34000", "0", "45.8M", "12.5", "0", "-"]
    assert out[4].split() == ["1", "4102", "ready", "1m02s", "1200", "2", "12.3M", "3.2", "1",
                              "rss", "limit", "(soft)"]
    assert out[5].split() == ["2", "-", "backoff", "-", "7", "-", "-", "-", "5", "exit", "code", "3"]
    assert out[6].split() == ["TOTAL", "35207", "2", "58.1M", "6"]
    # Columns line up: every row's PID column ends where the header's does.
    end = out[2].index("PID") + 3
    assert all(row[end - 1] != " " for row in out[3:6])


def test_cli_status_json(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = serve(dispatch=FakePrimary())
    assert cli.main(["status", "--json", "--socket", str(server.path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == STATUS
    assert out.startswith('{\n  "instance"')


def test_cli_status_shows_rollout(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    primary = FakePrimary()
    primary.status["rollout"] = rollout("running", 2)
    serve(dispatch=primary)
    assert cli.main(["status"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("rollout running 2/4 (batch 2)")


def test_cli_reload_rolling_done(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    primary = FakePrimary([rollout("running", 0), rollout("running", 0), rollout("running", 2),
                           rollout("running", 2), rollout("running", 4), rollout("done", 4)])
    serve(dispatch=primary)
    assert cli.main(["reload", "--rolling", "--batch", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "rolling reload started: 4 workers, 2 at a time",
        "replaced 2/4 workers",
        "replaced 4/4 workers",
        "rolling reload done",
    ]
    assert captured.err == ""
    assert primary.calls[0] == ("reload", {"batch": 2})
    assert {c for c, _ in primary.calls[1:]} == {"status"}


def test_cli_reload_rolling_failed(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    primary = FakePrimary([rollout("running", 0), rollout("running", 1),
                           rollout("failed", 1, message="new worker in slot 1 exited before ready")])
    serve(dispatch=primary)
    assert cli.main(["reload", "--rolling"]) == 1
    captured = capsys.readouterr()
    assert "replaced 1/4 workers" in captured.out
    assert captured.err.strip() == ("gunicorn-ext reload: rolling reload failed: "
                                    "new worker in slot 1 exited before ready")
    assert primary.calls[0] == ("reload", {})  # no --batch: the primary's setting applies


def test_cli_reload_timeout(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    primary = FakePrimary([rollout("running", 0)])
    primary.status["rollout"] = rollout("running", 1)  # stays running forever
    serve(dispatch=primary)
    assert cli.main(["reload", "--rolling", "--timeout", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "gave up waiting after 0.2 s" in err and "gunicorn-ext status" in err


def test_cli_reload_refused(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    serve(dispatch=FakePrimary())  # no rollout scripted: answers an error
    assert cli.main(["reload", "--rolling"]) == 1
    assert capsys.readouterr().err.strip() == "gunicorn-ext reload: nothing to reload"


def test_cli_reload_needs_rolling(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reload"]) == 2
    err = capsys.readouterr().err
    assert "kill -HUP" in err and "all" in err


def test_cli_scale(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    primary = FakePrimary()
    serve(dispatch=primary)
    assert cli.main(["scale", "3"]) == 0
    assert capsys.readouterr().out.strip() == "workers: 3 -> 3"
    assert primary.calls == [("scale", {"workers": 3})]
    assert cli.main(["scale", "5"]) == 0
    assert capsys.readouterr().out.strip() == "workers: 3 -> 5"


def test_cli_scale_minimal_answer(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    serve(dispatch=lambda cmd, args: {"ok": True, "workers": args["workers"]})
    assert cli.main(["scale", "2"]) == 0
    assert capsys.readouterr().out.strip() == "scaling to 2 workers"


@pytest.mark.parametrize("n", ["0", "-2", "two"])
def test_cli_scale_rejects_bad_counts(serve: Serve, capsys: pytest.CaptureFixture[str],
                                      n: str) -> None:
    primary = FakePrimary()
    serve(dispatch=primary)
    assert cli.main(["scale", "--", n] if n.startswith("-") else ["scale", n]) == 2
    assert "N" in capsys.readouterr().err
    assert primary.calls == []


def test_cli_errors_are_one_line(rundir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gunicorn-ext status: no gunicorn-ext instance")
    assert cli.main(["status", "--socket", str(rundir / "nope.sock")]) == 1
    assert "no control socket at" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
