"""A gracefully stopping worker closes its Socket.IO clients at once.

``examples/asgi_app`` as ``make run-asgi`` starts it, under ``-k asgi`` and
``uvicorn_worker.UvicornWorker``, and ``examples/flask_app`` under gthread and gevent,
two workers on per-worker ports behind nginx (the fixtures of
tests/test_socketio_workers.py), with ``GRACEFUL_TIMEOUT=30``. Gunicorn waits for every
open connection before a worker exits, and a Socket.IO client never ends its own:
without :meth:`gunicorn_ext.socketio.AsyncBusManager.close_clients` on the stop, an
ASGI worker with clients took the whole 30 s; the Flask example closed its own, but
with a CLOSE packet, after which python-socketio's client never reconnected (now it,
and :class:`~gunicorn_ext.socketio.BusManager`, abort the transport instead). Here a
TERM to one worker (what a rolling
reload, a scale-down and memory recycling send it) ends it well within that; its
clients, python-socketio and socket.io-client on long-polling, websocket and the
default upgrade, see a disconnect and reconnect by themselves; the other worker's
never notice; every message sent after is delivered to every client exactly once.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from harness import wait_for
from test_socketio_workers import (
    JS_KINDS,
    RECONNECT_WITHIN,
    TIMEOUT,
    Site,
    _back_elsewhere,
    _each_once,
    _node,
    _nonce,
    _py_clients,
    _say,
    _split_by_victim,
    _warm_up,
    _where_or_none,
    closing,  # noqa: F401  (fixtures)
    site,  # noqa: F401
)

GRACEFUL = 30
#: A stopping worker with open clients is gone within this (far below GRACEFUL): the
#: stop is seen within 0.1 s, -k asgi's main loop looks every 1 s, nginx and the
#: clients take a moment to let go.
GONE_WITHIN = 10.0

CASES = [
    pytest.param(("flask_app", "gthread"), id="flask-gthread"),
    pytest.param(("flask_app", "gevent"), id="flask-gevent"),
    pytest.param(("asgi_app", "asgi"), id="asgi"),
    pytest.param(("asgi_app", "uvicorn_worker.UvicornWorker"), id="uvicorn",
                 marks=pytest.mark.skipif(importlib.util.find_spec("uvicorn_worker") is None,
                                          reason="uvicorn-worker not installed (the asgi extra)")),
]


@pytest.fixture
def graceful_timeout() -> int:
    return GRACEFUL


@pytest.mark.slow
@pytest.mark.nginx
@pytest.mark.parametrize("site", CASES, indirect=True)
def test_a_stopping_worker_closes_its_clients_and_they_reconnect_elsewhere(
        site: Site, tmp_path: Path, closing: list[Any]) -> None:  # noqa: F811
    py = _py_clients(site, closing, reconnection=True)
    node = _node(site, tmp_path, closing)
    _warm_up(py, node)
    victim, stopped_pid, js_moved, js_stay, py_moved, py_stay = _split_by_victim(py, node)

    t0 = time.monotonic()
    os.kill(stopped_pid, signal.SIGTERM)  # a graceful stop; the arbiter refills slot 1
    wait_for(lambda: stopped_pid not in site.gunicorn.worker_pids(), GONE_WITHIN,
             interval=0.1, what=f"the stopped worker gone (graceful_timeout {GRACEFUL}s)\n"
                                f"{site.logs()}")
    took = time.monotonic() - t0
    assert took < GONE_WITHIN < GRACEFUL
    assert "Forcing close" not in site.gunicorn.log_text(), site.logs()

    wait_for(_back_elsewhere(node, stopped_pid, js_moved, py_moved), RECONNECT_WITHIN,
             interval=0.2, what=f"every client back\n{site.logs()}")
    after = {c["id"]: c for c in node.status()}
    # The stopped worker's clients saw a disconnect; the other worker's, nothing.
    assert all(after[cid]["disconnects"] for cid in js_moved), {c: after[c] for c in js_moved}
    assert all(len(after[cid]["connects"]) == 1 and not after[cid]["disconnects"]
               for cid in js_stay), {cid: after[cid] for cid in js_stay}
    assert all(c.connects == 1 for c in py_stay)
    for c in py_moved:
        c.where = wait_for(lambda c=c: _where_or_none(c), TIMEOUT, what=f"{c} answering")
        assert c.where["pid"] != stopped_pid
    _warm_up(py, node)
    for sender in (py[0], (node, "polling"), (node, "upgrade"), victim):
        text = _nonce("after-stop")
        _say(sender, text)
        py_counts, js_counts = _each_once(py, node, text)
        assert py_counts == [1] * len(py), (sender, text, py_counts)
        assert js_counts == [1] * sum(JS_KINDS.values()), (sender, text, js_counts)


def test_stop_callbacks_run_on_the_stop_and_again_and_a_failing_one_is_logged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn_ext.stopping on a loop: nothing runs before the stop; then each callback
    (plain and async) runs, again every STOP_POLL; one that raises is logged, and the
    others still run."""
    import asyncio
    import logging

    from gunicorn_ext import stopping

    monkeypatch.setattr(stopping, "_callbacks", [])
    monkeypatch.setattr(stopping, "STOP_POLL", 0.01)
    runs: list[str] = []

    def plain() -> None:
        runs.append("plain")

    async def coro() -> None:
        runs.append("async")

    def broken() -> None:
        raise RuntimeError("boom")

    for cb in (broken, plain, coro):
        stopping.on_stop(cb)
    state = {"stopping": False}
    log = logging.getLogger("test-stopping")
    errors: list[str] = []
    monkeypatch.setattr(log, "exception", lambda msg, *a: errors.append(msg % a))

    async def main() -> None:
        task = asyncio.ensure_future(stopping.watch(lambda: state["stopping"], log))
        await asyncio.sleep(0.1)
        assert runs == []
        state["stopping"] = True
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(main())
    assert runs.count("plain") >= 2 and runs.count("async") >= 2, runs
    assert errors and all("stop callback failed" in e for e in errors)
