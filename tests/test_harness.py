"""Tests of the test harness itself: real Gunicorn and real redis-server processes."""

from __future__ import annotations

import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis
from harness import Gunicorn, HarnessError, RedisServer, free_port, group_pids

APP = textwrap.dedent(
    """
    import os

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            body = b"ok"
        elif path == "/pid":
            body = str(os.getpid()).encode()
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    """
)

CONFIG = textwrap.dedent(
    """
    import os

    bind = os.environ.get("BIND", "127.0.0.1:8000")
    workers = int(os.environ.get("WORKERS", "1"))
    graceful_timeout = 5
    """
)


@pytest.fixture
def wsgi_dir(tmp_path: Path) -> Path:
    """A directory with ``tinyapp.py`` (exposing ``app``) and ``conf.py``."""
    directory = tmp_path / "site"
    directory.mkdir()
    (directory / "tinyapp.py").write_text(APP)
    (directory / "conf.py").write_text(CONFIG)
    return directory


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_gunicorn_serves_and_stops_cleanly(
    gunicorn_factory: Callable[..., Gunicorn], wsgi_dir: Path
) -> None:
    server = gunicorn_factory("tinyapp:app", config=wsgi_dir / "conf.py", cwd=wsgi_dir, workers=2)

    resp = server.get("/healthz")
    assert resp.status_code == 200
    assert resp.text == "ok"
    assert server.get("/nope").status_code == 404

    workers = server.wait_workers(2)
    assert len(workers) == 2
    assert server.master_pid not in workers
    pid = int(server.get("/pid").text)
    assert pid in workers
    assert server.url("healthz") == f"http://127.0.0.1:{server.port}/healthz"
    assert "Booting worker" in server.log_text()

    pgid = server.pgid
    assert set(workers) | {server.master_pid} <= set(group_pids(pgid))

    rc = server.stop()
    assert rc is not None
    assert group_pids(pgid) == []
    for worker in workers:
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    assert server.stop() == rc  # idempotent


@pytest.mark.slow
def test_gunicorn_without_config_and_sigkill_of_master(
    gunicorn_factory: Callable[..., Gunicorn], wsgi_dir: Path
) -> None:
    server = gunicorn_factory("tinyapp:app", cwd=wsgi_dir, workers=1)
    assert server.get("/healthz").ok
    workers = server.wait_workers(1)
    pgid = server.pgid
    # The master dies hard; stop() must still take the orphaned worker down.
    server.signal(signal.SIGKILL)
    rc = server.stop()
    assert rc == -signal.SIGKILL
    assert group_pids(pgid) == []
    assert all(not psutil.pid_exists(w) or psutil.Process(w).status() == psutil.STATUS_ZOMBIE for w in workers)


def test_gunicorn_failing_app_reports_log(
    gunicorn_factory: Callable[..., Gunicorn], wsgi_dir: Path
) -> None:
    (wsgi_dir / "broken.py").write_text("raise ImportError('boom from broken app')\n")
    with pytest.raises(HarnessError) as info:
        gunicorn_factory("broken:app", config=wsgi_dir / "conf.py", cwd=wsgi_dir, ready_timeout=30)
    assert "boom from broken app" in str(info.value)


@pytest.mark.redis
def test_redis_outage_and_recovery(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.set("k", "v")
    assert client.get("k") == b"v"

    redis_server.kill()
    assert not redis_server.alive()
    with pytest.raises(redis.ConnectionError):
        redis_server.client(socket_connect_timeout=0.5).ping()

    port = redis_server.port
    redis_server.start()
    assert redis_server.port == port
    assert redis_server.url == f"redis://127.0.0.1:{port}/0"
    fresh = redis.Redis.from_url(redis_server.url)
    assert fresh.ping()
    assert fresh.get("k") is None  # nothing persisted across the outage
    client.close()
    fresh.close()

    redis_server.stop()
    redis_server.stop()  # idempotent
    assert not redis_server.alive()
