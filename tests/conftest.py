"""Shared pytest fixtures: real Gunicorn instances and real Redis servers.

The machinery lives in ``tests/harness.py`` (importable as ``harness`` from tests and
from benchmarks that put ``tests/`` on ``sys.path``); this file only wraps it in
fixtures. Only ``nginx_site`` uses ``gunicorn_ext`` (its wrapper config), lazily.

Fixtures:

* ``gunicorn_factory`` -- ``start(app, *, config=None, cwd=None, env=None, workers=1,
  wait=True, ready_timeout=30.0, **kw) -> Gunicorn``; every instance is stopped (its
  whole process group SIGKILLed) at teardown.
* ``redis_server`` -- a running :class:`~harness.RedisServer`, always stopped at
  teardown. Fails (never skips) if ``redis-server`` is not installed.
* ``redis_server_factory`` -- ``start(**kw) -> RedisServer`` for tests needing several.
* ``redis_url`` -- the ``redis://`` URL of ``redis_server``.
* ``repo_root`` -- the repository root as a :class:`~pathlib.Path`.
* ``nginx_site`` -- ``run(conf_text, port) -> context manager`` running a real nginx on
  an http-context config (what ``gunicorn-ext nginx render`` prints), with an access
  log; yields nginx's directory (``error.log``, ``access.log``). Fails if nginx is
  not installed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Gunicorn, HarnessError, RedisServer, find_binary, free_port, running_nginx

__all__ = ["free_port"]

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO_ROOT


@pytest.fixture
def gunicorn_factory(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Yield ``start(app, **kw) -> Gunicorn``; stops every instance started, at teardown.

    Keyword arguments are those of :class:`harness.Gunicorn` (``config``, ``cwd``, ``env``,
    ``workers``, ``port``, ``args``, ``health_path``, ``name``) plus ``wait`` (default
    True: wait until ready) and ``ready_timeout`` (seconds, default 30). Logs go to
    ``tmp_path`` unless ``log_dir`` is given.
    """
    started: list[Gunicorn] = []

    def start(app: str, *, wait: bool = True, ready_timeout: float = 30.0, **kw: Any) -> Gunicorn:
        kw.setdefault("log_dir", tmp_path)
        server = Gunicorn(app, **kw)
        started.append(server)
        server.start()
        if wait:
            server.wait_ready(ready_timeout)
        return server

    yield start
    for server in reversed(started):
        server.stop()


def _redis_or_fail(directory: Path, **kw: Any) -> RedisServer:
    if kw.get("binary") is None and find_binary("redis-server") is None:
        pytest.fail(
            "redis-server is not installed (looked on PATH, /usr/sbin, /usr/bin): "
            "run `make system-deps` or `apt-get install redis-server`",
            pytrace=False,
        )
    try:
        return RedisServer(directory, **kw).start()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Yield ``start(**kw) -> RedisServer`` (running); every one is stopped at teardown."""
    started: list[RedisServer] = []

    def start(**kw: Any) -> RedisServer:
        directory = tmp_path / f"redis-{len(started)}"
        directory.mkdir(parents=True, exist_ok=True)
        server = _redis_or_fail(directory, **kw)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def redis_server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A running redis-server on a free 127.0.0.1 port (no persistence), stopped after."""
    return redis_server_factory()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the ``redis_server`` fixture."""
    return redis_server.url


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Show which external binaries the run will use."""
    return [
        f"redis-server: {find_binary('redis-server') or 'MISSING'}; "
        f"nginx: {find_binary('nginx') or 'MISSING'}; cpus: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
    ]


@pytest.fixture
def nginx_site(tmp_path: Path) -> Callable[[str, int], contextlib.AbstractContextManager[Path]]:
    """Return ``run(conf_text, port)``: nginx on *conf_text* (an http-context config that
    listens on *port*) in a fresh directory under ``tmp_path``; always killed after."""
    from gunicorn_ext.nginx import wrapper_conf

    count = [0]

    @contextlib.contextmanager
    def run(conf_text: str, port: int) -> Iterator[Path]:
        count[0] += 1
        directory = tmp_path / f"nginx-{count[0]}"
        directory.mkdir()
        site = directory / "site.conf"
        site.write_text(conf_text)
        conf = directory / "nginx.conf"
        conf.write_text(wrapper_conf([str(site)], str(directory), access_log=True,
                                     user="root" if os.geteuid() == 0 else None))
        try:
            with running_nginx(conf, port) as prefix:
                yield prefix
        except HarnessError as exc:
            if "not installed" in str(exc):
                pytest.fail(str(exc), pytrace=False)
            raise

    return run
