"""Shared pytest fixtures: real Gunicorn instances and real Redis servers.

The machinery lives in ``tests/harness.py`` (importable as ``harness`` from tests and
from benchmarks that put ``tests/`` on ``sys.path``); this file only wraps it in
fixtures. Nothing here imports ``gunicorn_ext``.

Fixtures:

* ``gunicorn_factory`` -- ``start(app, *, config=None, cwd=None, env=None, workers=1,
  wait=True, ready_timeout=30.0, **kw) -> Gunicorn``; every instance is stopped (its
  whole process group SIGKILLed) at teardown.
* ``redis_server`` -- a running :class:`~harness.RedisServer`, always stopped at
  teardown. Fails (never skips) if ``redis-server`` is not installed.
* ``redis_server_factory`` -- ``start(**kw) -> RedisServer`` for tests needing several.
* ``redis_url`` -- the ``redis://`` URL of ``redis_server``.
* ``repo_root`` -- the repository root as a :class:`~pathlib.Path`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Gunicorn, HarnessError, RedisServer, find_binary, free_port

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
