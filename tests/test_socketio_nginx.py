"""Socket.IO long-polling through nginx, pinned to one Gunicorn worker by the route cookie.

The example (examples/flask_app) as ``make run`` starts it: its cluster_conf.py, two
instances of two gthread workers, per-worker ports (``WORKER_PORTS_BASE``) and one real
redis-server (``STATE_URL``). The example has no sticky code: with per-worker ports the
config's ``sticky`` setting pins each client to the worker that answered (the cookie
names that worker's port). nginx (rendered by :func:`gunicorn_ext.nginx.render`) has the
four worker ports as backends: a new client's handshake goes to the pool, the answering
worker pins it, and every later poll of that Engine.IO session reaches the same worker
(else: "Session ID unknown"). The JavaScript clients are in tests/test_chat.py.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import socketio
from harness import Gunicorn, RedisServer, free_port, free_port_pair, serves, tail, wait_for

from gunicorn_ext.nginx import render
from gunicorn_ext.sticky import route_name

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app"
SESSIONS = 100
#: Route cookies no backend ever set, given to every 10th session: nginx's whitelist sends
#: each to the pool, and the worker that answers re-pins the client.
FORGED = ["127.0.0.1:22", "evil", "gx_127_0_0_1_22", "127_0_0_1_1", "x" * 3000, ""]
OVERALL = 120.0


def _session(url: str, forged: str | None = None) -> tuple[dict[str, int], str | None]:
    """One polling-only client session: connect /chat, call ``where``, disconnect.

    Returns the ``where`` answer and the route cookie the client held for its polls.
    With *forged*, the client starts with that as its route cookie.
    """
    http = requests.Session()  # python-socketio's polls go through it: it keeps the cookie
    if forged is not None:  # the domain and path the backend's own cookie replaces
        http.cookies.set("gx_route", forged, domain="127.0.0.1", path="/")
    sio = socketio.Client(reconnection=False, http_session=http)
    try:
        sio.connect(url, transports=["polling"], namespaces=["/chat"], wait_timeout=5)
        assert sio.transport() == "polling"
        where: dict[str, int] = sio.call("where", namespace="/chat", timeout=5)
        return where, http.cookies.get("gx_route")
    finally:
        # Not sio.disconnect(): python-engineio's client (4.15) drops its CLOSE packet when
        # it follows another one (its write loop stops on the state change), and the
        # session then waits for the server's ping (25 s) to end. A lone CLOSE goes out.
        sio.eio.disconnect(abort=True)
        http.close()


def _two_instances(gunicorn_factory: Callable[..., Gunicorn],
                   redis: RedisServer) -> tuple[list[Gunicorn], list[int], str, int]:
    """Two example instances of 2 workers with per-worker ports: (instances, their port
    bases, the rendered nginx config with the four worker ports as backends, its port)."""
    bases = [free_port_pair(), free_port_pair()]
    while bases[1] in (bases[0] - 1, bases[0], bases[0] + 1):
        bases[1] = free_port_pair()
    instances = [
        gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2,
                         env={"WORKER_PORTS_BASE": str(base), "STATE_URL": redis.url,
                              "SECRET_KEY": "k" * 32}, name=f"gunicorn-{i}")
        for i, base in enumerate(bases)
    ]
    worker_ports = [base + slot for base in bases for slot in (0, 1)]
    wait_for(lambda: all(serves(p) for p in worker_ports), 20, what="all four worker ports")
    for port in worker_ports:  # each worker port pins to itself, once
        r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert r.headers.get("Set-Cookie") == (
            f"gx_route={route_name(f'127.0.0.1:{port}')}; Path=/; HttpOnly; SameSite=Lax")
    listen = free_port()
    conf = render(backends=[f"127.0.0.1:{p}" for p in worker_ports], listen=listen,
                  server_name="127.0.0.1", default_server=False)
    return instances, bases, conf, listen


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.nginx
def test_polling_clients_stay_on_one_worker_through_nginx(
        gunicorn_factory: Callable[..., Gunicorn], redis_server: RedisServer,
        nginx_site: Callable[..., Any]) -> None:
    instances, bases, conf, listen = _two_instances(gunicorn_factory, redis_server)
    with nginx_site(conf, listen) as ngx:
        url = f"http://127.0.0.1:{listen}"
        pids = [set(g.worker_pids()) for g in instances]
        deadline = time.monotonic() + OVERALL
        seen: set[int] = set()
        for n in range(SESSIONS):
            assert time.monotonic() < deadline, f"only {n} sessions in {OVERALL}s"
            forged = FORGED[n // 10 % len(FORGED)] if n % 10 == 0 else None
            try:
                where, cookie = _session(url, forged)
            except (socketio.exceptions.SocketIOError, requests.RequestException) as exc:
                pytest.fail(f"session {n} failed: {exc!r}\nnginx:\n{tail(ngx / 'error.log')}",
                            pytrace=False)
            inst = next(i for i, p in enumerate(pids) if where["pid"] in p)
            # The cookie the client polled with names exactly the worker that answered.
            assert cookie == route_name(f"127.0.0.1:{bases[inst] + where['slot']}"), (n, where, cookie)
            seen.add(where["pid"])
        assert len(seen) > 1, seen

        log = (ngx / "access.log").read_text()
        # Per Engine.IO session, in order: every request answered 200, except that the
        # client's last long-poll GET may race its own close packet and get 400 (the session
        # is already gone then); a 400 anywhere else would be a poll sent to the wrong worker.
        by_sid: dict[str, list[tuple[str, str]]] = {}
        for m in re.finditer(r'"(GET|POST) /socket\.io/\?\S*?sid=([\w-]+)\S* HTTP/1\.1" (\d+)', log):
            by_sid.setdefault(m[2], []).append((m[1], m[3]))
        assert len(by_sid) == SESSIONS, len(by_sid)
        for sid, reqs in by_sid.items():
            bad = [i for i, (_, status) in enumerate(reqs) if status != "200"]
            # nginx logs at completion: the close POST may be logged just after that GET.
            assert bad == [] or (len(bad) == 1 and bad[0] >= len(reqs) - 2
                                 and reqs[bad[0]] == ("GET", "400")), (sid, reqs)
        for g in instances:
            text = g.log_text()
            assert "Session ID unknown" not in text and "Invalid session" not in text, g.log_text_tail()


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.nginx
def test_polling_client_repins_when_its_instance_dies(
        gunicorn_factory: Callable[..., Gunicorn], redis_server: RedisServer,
        nginx_site: Callable[..., Any]) -> None:
    # A long-polling client pinned to a worker of one instance; that instance is
    # SIGKILLed. nginx falls back to the pool, the worker that answers re-pins the
    # client, and python-socketio's reconnection opens a new session there.
    instances, bases, conf, listen = _two_instances(gunicorn_factory, redis_server)
    with nginx_site(conf, listen) as ngx:
        http = requests.Session()
        sio = socketio.Client(reconnection=True, reconnection_delay=0.2,
                              reconnection_delay_max=1, http_session=http)
        connects: list[float] = []
        sio.on("connect", lambda: connects.append(time.monotonic()), namespace="/chat")
        try:
            sio.connect(f"http://127.0.0.1:{listen}", transports=["polling"],
                        namespaces=["/chat"], wait_timeout=5)
            first = sio.call("where", namespace="/chat", timeout=5)
            dead = next(i for i, g in enumerate(instances) if first["pid"] in g.worker_pids())
            alive = 1 - dead
            alive_pids = set(instances[alive].worker_pids())
            os.killpg(instances[dead].pgid, signal.SIGKILL)

            def repinned() -> dict[str, int] | None:
                if len(connects) < 2:
                    return None
                try:
                    where: dict[str, int] = sio.call("where", namespace="/chat", timeout=2)
                except socketio.exceptions.SocketIOError:
                    return None
                return where

            try:
                second = wait_for(repinned, 20, what="the client back on the other instance")
            except Exception:
                pytest.fail(f"no re-pin; nginx:\n{tail(ngx / 'error.log')}", pytrace=False)
            assert second["pid"] in alive_pids
            assert http.cookies.get("gx_route") == route_name(
                f"127.0.0.1:{bases[alive] + second['slot']}")
            for _ in range(5):  # and it goes on, on that one worker
                assert sio.call("where", namespace="/chat", timeout=5)["pid"] == second["pid"]
        finally:
            sio.disconnect()
            http.close()
