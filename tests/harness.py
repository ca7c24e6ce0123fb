"""Reusable process harness for the test-suite (and benchmarks): real Gunicorn, real Redis.

Nothing here imports ``gunicorn_ext``: the harness drives the ``gunicorn`` and
``redis-server`` binaries exactly as a user would, so it can test any config.

* :func:`free_port` -- a TCP port on 127.0.0.1 that nobody is listening on.
* :class:`Gunicorn` -- one Gunicorn master in its own process group, its output in a
  log file, with helpers to wait for readiness, send requests and signals, list workers,
  and stop it so that no process of its group survives.
* :class:`RedisServer` -- a throw-away ``redis-server`` on a free port, which can be
  SIGKILLed (an outage) and started again on the same port.

Every instance started is also registered for an ``atexit`` sweep, so even an
interrupted test run does not leave servers behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil
import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "Gunicorn",
    "HarnessError",
    "RedisServer",
    "find_binary",
    "free_port",
    "group_pids",
    "tail",
    "wait_for",
]

LOG_TAIL_LINES = 60
PORTS_FLOOR = 20000  # test servers listen on ports from here up to the ephemeral range
REQUEST_TIMEOUT = 5.0


class HarnessError(RuntimeError):
    """A server the harness started did not come up, or misbehaved."""


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections' ports)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, *ports: int) -> bool:
    socks: list[socket.socket] = []
    try:
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def _free_ports(host: str, count: int) -> int:
    """A port p such that p .. p+count-1 are all free right now.

    Chosen at random below the ephemeral range when there is room, so no outgoing
    connection (nor the TIME-WAIT it leaves, tens of thousands after a load test) can
    hold it or take it between this check and the server's bind; else the kernel's pick.
    """
    low = _ephemeral_low()
    if low > PORTS_FLOOR + 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            p = rng.randrange(PORTS_FLOOR, low - count)
            if _bindable(host, *range(p, p + count)):
                return p
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            p = int(sock.getsockname()[1])
        if p + count - 1 <= 65535 and _bindable(host, *range(p, p + count)):
            return p
    raise HarnessError(f"no {count} consecutive free ports on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on *host* that is free right now."""
    return _free_ports(host, 1)


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p such that p and p+1 are both free (per-worker ports of a 2-worker instance)."""
    return _free_ports(host, 2)


def serves(port: int, path: str = "/healthz", host: str = "127.0.0.1") -> bool:
    """True when ``http://host:port/path`` answers 200 on a fresh connection."""
    try:
        r = requests.get(f"http://{host}:{port}{path}", headers={"Connection": "close"}, timeout=2)
    except requests.RequestException:
        return False
    return r.status_code == 200


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last *lines* lines of the text file *path* ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll *predicate* until it returns something truthy; return that value.

    Raises :class:`HarnessError` naming *what* after *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def find_binary(name: str, extra_dirs: Sequence[str] = ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin")) -> str | None:
    """Find executable *name* on PATH or in *extra_dirs* (``/usr/sbin`` is often off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def group_pids(pgid: int) -> list[int]:
    """Return the pids of live (non-zombie) processes whose process group is *pgid*."""
    pids: list[int] = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.info["pid"]) == pgid:
                pids.append(proc.info["pid"])
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return sorted(pids)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# Everything started and not yet stopped, swept at interpreter exit.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _sweep() -> None:  # pragma: no cover - only matters for interrupted runs
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(timeout=2)


class Gunicorn:
    """One real Gunicorn master (``sys.executable -m gunicorn``) in its own process group.

    The bind address and worker count reach the config file through the environment
    (``BIND=127.0.0.1:<port>``, ``WORKERS=<n>``), as ``examples/flask_app/cluster_conf.py``
    expects; with no config file they are passed as ``--bind``/``--workers`` instead.

    Each instance also gets its own ``XDG_RUNTIME_DIR`` (``<log_dir>/run-<port>``) unless
    *env* sets one, so Gunicorn's default control socket (``$XDG_RUNTIME_DIR/gunicorn.ctl``)
    and anything else keyed on it never collide between instances. Pass :attr:`env` to a
    CLI you run against this instance so it finds the same socket.
    """

    def __init__(
        self,
        app: str,
        *,
        config: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        workers: int = 1,
        port: int | None = None,
        host: str = "127.0.0.1",
        args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        health_path: str | None = "/healthz",
        name: str = "gunicorn",
        python: str = sys.executable,
    ) -> None:
        self.app = app
        self.python = python
        self.config = str(config) if config is not None else None
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.workers = workers
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.bind = f"{host}:{self.port}"
        self.args = list(args)
        self.health_path = health_path
        self.log_dir = Path(log_dir) if log_dir is not None else self.cwd
        self.log_path = self.log_dir / f"{name}-{self.port}.log"
        self.runtime_dir = self.log_dir / f"run-{self.port}"
        self.env: dict[str, str] = dict(os.environ)
        self.env.update(
            {
                "BIND": self.bind,
                "WORKERS": str(workers),
                "PYTHONUNBUFFERED": "1",
                "XDG_RUNTIME_DIR": str(self.runtime_dir),
            }
        )
        if env:
            self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.returncode: int | None = None
        self.session = requests.Session()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        """The argv used to start Gunicorn."""
        cmd = [self.python, "-m", "gunicorn"]
        if self.config is not None:
            cmd += ["-c", self.config]
        else:
            cmd += ["--bind", self.bind, "--workers", str(self.workers)]
        cmd += ["--chdir", str(self.cwd), *self.args, self.app]
        return cmd

    def start(self) -> Gunicorn:
        """Start the master (not waiting for it to serve; see :meth:`wait_ready`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError(f"gunicorn on {self.bind} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        Path(self.env["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        self._log.write(f"### harness: {' '.join(self.command)}\n".encode())
        self._log.flush()
        self.returncode = None
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.add(self)
        return self

    @property
    def master_pid(self) -> int:
        """The master's pid (also its process-group id)."""
        if self.proc is None:
            raise HarnessError("gunicorn was never started")
        return self.proc.pid

    @property
    def pgid(self) -> int:
        """The process group holding the master and its workers."""
        return self.master_pid

    def alive(self) -> bool:
        """True while the master process is running."""
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0, path: str | None = None) -> Gunicorn:
        """Wait until the server answers HTTP, then return ``self``.

        Polls ``GET path`` (default :attr:`health_path`) until it returns 200; with no path
        at all (``health_path=None``) any HTTP response counts. Raises
        :class:`HarnessError` with the last log lines if the master exits or *timeout*
        passes.
        """
        path = path if path is not None else self.health_path
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while True:
            if not self.alive():
                rc = self.proc.returncode if self.proc is not None else None
                raise HarnessError(
                    f"gunicorn on {self.bind} exited (rc={rc}) before it was ready\n"
                    f"--- last {LOG_TAIL_LINES} log lines ({self.log_path}) ---\n{self.log_text_tail()}"
                )
            try:
                resp = requests.get(self.url(path or "/"), timeout=1.0)
                if path is None or resp.status_code == 200:
                    return self
                last_error = f"GET {path} -> {resp.status_code}"
            except requests.RequestException as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"gunicorn on {self.bind} not ready after {timeout:.1f}s ({last_error})\n"
                    f"--- last {LOG_TAIL_LINES} log lines ({self.log_path}) ---\n{self.log_text_tail()}"
                )
            time.sleep(0.05)

    def wait_workers(self, count: int | None = None, timeout: float = 30.0) -> list[int]:
        """Wait until the master has exactly *count* (default: ``workers``) children."""
        want = self.workers if count is None else count

        def ready() -> list[int] | None:
            if not self.alive():
                raise HarnessError(
                    f"gunicorn on {self.bind} exited while waiting for workers\n{self.log_text_tail()}"
                )
            pids = self.worker_pids()
            return pids if len(pids) == want else None

        result: list[int] = wait_for(ready, timeout, what=f"{want} workers on {self.bind}")
        return result

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the server; idempotent. Returns the master's exit code.

        Sends SIGTERM to the master and waits up to *timeout* seconds for it to exit, then
        SIGKILLs the whole process group regardless, so no worker or helper survives.
        """
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            _killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            # Orphaned workers are reparented and reaped by init; wait until they are gone.
            with contextlib.suppress(HarnessError):
                wait_for(lambda: not group_pids(proc.pid), 5.0, what="process group to exit")
            self.returncode = proc.returncode
            if self._log is not None:
                self._log.close()
                self._log = None
            self.session.close()
            _LIVE.discard(self)
        return self.returncode

    def restart(self, timeout: float = 30.0) -> Gunicorn:
        """Stop, then start again on the same port and wait until ready."""
        self.stop()
        self.session = requests.Session()
        return self.start().wait_ready(timeout)

    def __enter__(self) -> Gunicorn:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes and signals ---------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Pids of the master's direct children (its workers), sorted."""
        try:
            children = psutil.Process(self.master_pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
        return sorted(pids)

    def group_pids(self) -> list[int]:
        """Pids of every live process in this instance's process group."""
        return group_pids(self.pgid)

    def signal(self, sig: int) -> None:
        """Send *sig* to the master."""
        os.kill(self.master_pid, sig)

    # -- HTTP --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.bind}"

    def url(self, path: str = "/") -> str:
        """Absolute URL of *path* on this instance."""
        if not path.startswith("/"):
            path = "/" + path
        return self.base_url + path

    def get(self, path: str = "/", **kw: Any) -> requests.Response:
        """``GET`` *path* with a short default timeout (a fresh connection each time)."""
        kw.setdefault("timeout", REQUEST_TIMEOUT)
        return requests.get(self.url(path), **kw)

    def post(self, path: str = "/", **kw: Any) -> requests.Response:
        """``POST`` to *path* with a short default timeout."""
        kw.setdefault("timeout", REQUEST_TIMEOUT)
        return requests.post(self.url(path), **kw)

    def request(self, method: str, path: str = "/", **kw: Any) -> requests.Response:
        """Any method, through :attr:`session` (keeps cookies between calls)."""
        kw.setdefault("timeout", REQUEST_TIMEOUT)
        return self.session.request(method, self.url(path), **kw)

    # -- logs --------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        if self._log is not None:
            with contextlib.suppress(ValueError):
                self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_text_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last *lines* lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until *needle* appears in the log; return the log text."""
        result: str = wait_for(
            lambda: self.log_text() if needle in self.log_text() else None,
            timeout,
            what=f"{needle!r} in {self.log_path}",
        )
        return result

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<Gunicorn {self.app} on {self.bind} {state}>"


class RedisServer:
    """A throw-away ``redis-server`` on 127.0.0.1, no persistence, in its own session.

    :meth:`kill` SIGKILLs it (an outage); :meth:`start` brings it back on the same port
    (empty, since nothing is saved).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        port: int | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        found = binary or find_binary("redis-server")
        if found is None:
            raise HarnessError(
                "redis-server not found on PATH, /usr/sbin or /usr/bin; "
                "run `make system-deps` (apt-get install redis-server)"
            )
        self.binary = found
        self.dir = Path(directory)
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(self.host)
        self.extra_args = list(extra_args)
        self.log_path = self.dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip

    def client(self, **kw: Any) -> redis.Redis:
        """A new redis-py client for this server.

        Short timeouts and no automatic retries by default, so an outage shows at once.
        """
        kw.setdefault("socket_timeout", 2.0)
        kw.setdefault("retry", Retry(NoBackoff(), 0))
        kw.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(host=self.host, port=self.port, **kw)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start (or restart) the server and wait until it answers PING."""
        if self.alive():
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while True:
            if not self.alive():
                raise HarnessError(
                    f"redis-server on port {self.port} exited (rc={self.proc.returncode})\n"
                    f"{tail(self.log_path)}"
                )
            try:
                with contextlib.closing(self.client(socket_timeout=0.5)) as conn:
                    if conn.ping():
                        return self
            except redis.RedisError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                self.kill()
                raise HarnessError(
                    f"redis-server on port {self.port} did not answer PING in {timeout:.1f}s "
                    f"({last_error})\n{tail(self.log_path)}"
                )
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash/outage); :meth:`start` revives it."""
        proc = self.proc
        if proc is None:
            return
        _killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server for good (SIGTERM, then SIGKILL); idempotent."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
            self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        _LIVE.discard(self)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<RedisServer {self.url} {state}>"


@contextlib.contextmanager
def running_nginx(conf: Path, port: int, timeout: float = 15.0) -> Iterator[Path]:
    """nginx in the foreground on the main config *conf*, its prefix (logs, pid, temp
    files) the config's directory; yields that directory once *port* accepts, and
    always kills the process group (master and workers) after.

    ``nginx -t`` runs first. The caller writes *conf* (e.g. with
    ``gunicorn_ext.nginx.wrapper_conf``); as root it must say ``user root;``, since
    nginx workers would otherwise switch to "nobody", who cannot enter a 0700 tmp dir.
    """
    nginx = find_binary("nginx")
    if nginx is None:
        raise HarnessError("nginx is not installed; run `make system-deps` (apt-get install nginx)")
    prefix = conf.parent
    err = prefix / "error.log"
    base = [nginx, "-p", f"{prefix}/", "-e", str(err), "-c", str(conf)]
    check = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=20,
                           stdin=subprocess.DEVNULL)
    if check.returncode != 0:
        raise HarnessError(f"nginx -t failed on {conf}:\n{check.stderr}")
    proc = subprocess.Popen([*base, "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise HarnessError(f"nginx exited rc={proc.returncode}:\n{tail(err)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"nginx not listening on {port} after {timeout}s:\n{tail(err)}")
            time.sleep(0.05)
        yield prefix
    finally:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


@contextlib.contextmanager
def running_gunicorn(app: str, **kw: Any) -> Iterator[Gunicorn]:
    """Context manager: start a :class:`Gunicorn`, wait until ready, always stop it."""
    timeout = kw.pop("ready_timeout", 30.0)
    server = Gunicorn(app, **kw)
    try:
        server.start().wait_ready(timeout)
        yield server
    finally:
        server.stop()
