"""Socket.IO across the workers of every worker class that can hold it, with real clients.

The examples as ``make run`` / ``make run-asgi`` start them, two workers on per-worker
ports behind the nginx config ``gunicorn-ext nginx render`` gives (the route cookie
pins each long-polling session to its worker):

* ``examples/flask_app`` under ``WORKER_CLASS=gevent``: Flask-SocketIO with
  ``async_mode="gevent"`` and :class:`gunicorn_ext.socketio.BusManager`;
* ``examples/asgi_app`` under ``-k asgi`` and ``uvicorn_worker.UvicornWorker``:
  python-socketio's ``AsyncServer`` with :class:`gunicorn_ext.socketio.AsyncBusManager`.

Clients: socket.io-client in node (``tests/js``: long-polling, websocket, and its default
upgrade) and python-socketio (long-polling through nginx, websocket on each worker's own
port). Every check is that each client gets each message exactly once. The faults: bad
input (an error in the ack, broadcast to no one), a flood of emits (no worker is cut off the bus, nothing lost or doubled) and a worker
SIGKILLed under its clients (the other worker's clients keep getting every message; the
killed one's reconnect through nginx and get them again). The Flask example's raw ``/ws``
chat under gevent is here too; the gthread case of that example is tests/test_chat.py.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import engineio.payload
import pytest
import requests
import socketio
from harness import Gunicorn, free_port, free_port_pair, serves, tail, wait_for
from test_chat import NodeClients, RawClient

from gunicorn_ext.nginx import render

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 5.0
DUPLICATE_WINDOW = 0.5
JS_READY = 30.0
RECONNECT_WITHIN = 15.0
FLOOD = 600  # says from one client, as fast as it can send them

CASES = [
    pytest.param(("flask_app", "gevent"), id="flask-gevent"),
    pytest.param(("asgi_app", "asgi"), id="asgi"),
    pytest.param(("asgi_app", "uvicorn_worker.UvicornWorker"), id="uvicorn",
                 marks=pytest.mark.skipif(importlib.util.find_spec("uvicorn_worker") is None,
                                          reason="uvicorn-worker not installed (the asgi extra)")),
]
#: socket.io-client kinds and counts (tests/js/clients.js); no raw /ws clients here.
JS_KINDS = {"polling": 3, "websocket": 3, "upgrade": 2}
TRANSPORT = {"polling": "polling", "websocket": "websocket", "upgrade": "websocket"}
#: Lines in a worker's log that mean the bus failed it.
BUS_LOST = ("lost its bus", "closing the bus connection")


# ----------------------------------------------------------------------------- clients


class PyClient:
    """A python-socketio client on ``/chat``, counting each ``said`` text it receives."""

    def __init__(self, url: str, transport: str, reconnection: bool = False) -> None:
        self.transport = transport
        self.http = requests.Session()  # its polls go through it: it keeps the route cookie
        self.sio = socketio.Client(reconnection=reconnection, reconnection_delay=0.2,
                                   reconnection_delay_max=1, http_session=self.http)
        self.got: collections.Counter[str] = collections.Counter()
        self.connects = 0
        self._lock = threading.Lock()

        @self.sio.on("said", namespace="/chat")
        def _said(data: Any) -> None:
            with self._lock:
                self.got[data["text"]] += 1

        @self.sio.on("connect", namespace="/chat")
        def _connect() -> None:
            self.connects += 1

        self.sio.connect(url, transports=[transport], namespaces=["/chat"], wait_timeout=TIMEOUT)
        self.where = self.ask_where()

    def ask_where(self) -> dict[str, Any]:
        where: dict[str, Any] = self.sio.call("where", namespace="/chat", timeout=TIMEOUT)
        return where

    def count(self, text: str) -> int:
        with self._lock:
            return self.got[text]

    def close(self) -> None:
        if self.transport == "polling":
            # python-engineio's client drops a CLOSE packet that follows another one
            # (see tests/test_socketio_nginx.py): a lone abort ends the session at once.
            self.sio.eio.disconnect(abort=True)
        else:
            self.sio.disconnect()
        self.http.close()

    def __repr__(self) -> str:
        return f"<PyClient {self.transport} on {self.where}>"


@dataclass
class Site:
    """One example instance of two workers on per-worker ports, behind nginx."""

    gunicorn: Gunicorn
    base: int
    url: str  # nginx
    nginx_dir: Path

    def logs(self) -> str:
        return f"{self.gunicorn.log_text_tail()}\nnginx:\n{tail(self.nginx_dir / 'error.log')}"


@pytest.fixture
def graceful_timeout() -> int:
    """The example's GRACEFUL_TIMEOUT: short, so a teardown with open clients is short."""
    return 3


@pytest.fixture
def site(request: pytest.FixtureRequest, gunicorn_factory: Callable[..., Gunicorn],
         nginx_site: Callable[..., Any], tmp_path: Path, graceful_timeout: int) -> Iterator[Site]:
    example, worker_class = request.param
    where = EXAMPLES / example
    base = free_port_pair()
    g = gunicorn_factory("app:app", config=where / "cluster_conf.py", cwd=where, workers=2,
                         env={"WORKER_CLASS": worker_class, "WORKER_PORTS_BASE": str(base),
                              "INSTANCE": "solo", "STATE_URL": f"sqlite:///{tmp_path / 's.db'}",
                              "SECRET_KEY": "k" * 32,
                              "GRACEFUL_TIMEOUT": str(graceful_timeout)})
    wait_for(lambda: all(serves(base + slot) for slot in (0, 1)), 20, what="both worker ports")
    listen = free_port()
    conf = render(backends=[f"127.0.0.1:{base + slot}" for slot in (0, 1)], listen=listen,
                  server_name="127.0.0.1", default_server=False)
    with nginx_site(conf, listen) as ngx:
        yield Site(g, base, f"http://127.0.0.1:{listen}", ngx)


@pytest.fixture
def closing() -> Iterator[list[PyClient | NodeClients]]:
    """Clients appended here are closed at teardown, before the servers stop."""
    clients: list[PyClient | NodeClients] = []
    yield clients
    for c in clients:
        with contextlib.suppress(Exception):
            c.close()


def _nonce(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def _py_clients(site: Site, closing: list[Any], reconnection: bool = False) -> list[PyClient]:
    """Long-polling through nginx (x2) and websocket on each worker's own port."""
    clients = [PyClient(site.url, "polling", reconnection) for _ in range(2)]
    clients += [PyClient(f"http://127.0.0.1:{site.base + slot}", "websocket", reconnection)
                for slot in (0, 1)]
    closing.extend(clients)
    assert [c.where["slot"] for c in clients[2:]] == [0, 1]
    return clients


def _node(site: Site, tmp_path: Path, closing: list[Any]) -> NodeClients:
    node = NodeClients(site.url, JS_KINDS, tmp_path / "node.log")
    closing.append(node)
    node.ready(JS_READY)
    wait_for(lambda: all(c["transport"] == TRANSPORT[c["kind"]] for c in node.status()),
             TIMEOUT * 2, what="the upgrades to websocket")
    return node


def _js_counts(node: NodeClients, text: str) -> list[int]:
    return [c["received"].get(text, 0) for c in node.status()]


def _say(sender: PyClient | tuple[NodeClients, str], text: str) -> None:
    if isinstance(sender, PyClient):
        ack = sender.sio.call("say", {"text": text}, namespace="/chat", timeout=TIMEOUT)
    else:
        node, kind = sender
        ack = node.command("said", cmd="say", kind=kind, text=text).get("ack", {"error": "none"})
    assert "id" in ack, ack


def _each_once(py: list[PyClient], node: NodeClients | None, text: str,
               timeout: float = TIMEOUT) -> tuple[list[int], list[int]]:
    """Wait until every client has *text* (or timeout), then a moment for duplicates:
    how many times each Python client and each node client got it."""

    def counts() -> tuple[list[int], list[int]]:
        return [c.count(text) for c in py], (_js_counts(node, text) if node else [])

    with contextlib.suppress(Exception):
        wait_for(lambda: all(counts()[0]) and all(counts()[1]), timeout, interval=0.1, what=text)
    time.sleep(DUPLICATE_WINDOW)
    return counts()


def _warm_up(py: list[PyClient], node: NodeClients | None) -> None:
    """A worker subscribes to the bus at its first Socket.IO connection: probe until every
    client has seen a probe (what each test checks comes after)."""
    deadline = time.monotonic() + 10
    n = 0
    while True:
        text = f"probe-{n}-{uuid.uuid4().hex[:6]}"
        _say(py[-1], text)
        n += 1
        time.sleep(0.2)
        py_ok = all(any(t.startswith("probe-") for t in c.got) for c in py)
        js_ok = node is None or all(any(t.startswith("probe-") for t in c["received"])
                                    for c in node.status())
        if py_ok and js_ok:
            return
        assert time.monotonic() < deadline, "not every client got a probe within 10 s"


def _split_by_victim(py: list[PyClient], node: NodeClients
                     ) -> tuple[PyClient, int, set[str], set[str], list[PyClient], list[PyClient]]:
    """The worker to stop or kill: the one of slot 1's websocket client (the victim).
    Returns the victim, that worker's pid, the node clients on it and elsewhere, and the
    python clients on it and elsewhere (each side has some)."""
    before = {c["id"]: c for c in node.status()}
    victim = next(c for c in py if c.transport == "websocket" and c.where["slot"] == 1)
    pid = victim.where["pid"]
    js_on = {cid for cid, c in before.items() if c["where"]["pid"] == pid}
    js_off = set(before) - js_on
    py_on = [c for c in py if c.where["pid"] == pid]
    py_off = [c for c in py if c.where["pid"] != pid]
    assert js_on and js_off and py_off, (before, py)
    return victim, pid, js_on, js_off, py_on, py_off


def _back_elsewhere(node: NodeClients, pid: int, js_on: set[str],
                    py_on: list[PyClient]) -> Callable[[], bool]:
    """Whether every client is connected again, those of worker *pid* to another one."""
    def back() -> bool:
        js_ok = all(c["connected"] and c["where"] and (c["id"] not in js_on or (
            len(c["connects"]) > 1 and c["where"]["pid"] != pid)) for c in node.status())
        return js_ok and all(c.sio.connected and c.connects >= 2 for c in py_on)
    return back


def _bus_intact(site: Site, pids: set[int]) -> None:
    text = site.gunicorn.log_text()
    for needle in BUS_LOST:
        assert needle not in text, site.logs()
    assert set(site.gunicorn.worker_pids()) == pids, site.logs()
    cluster = requests.get(f"http://127.0.0.1:{site.base}/cluster", timeout=TIMEOUT).json()
    assert sorted(w["slot"] for w in cluster["workers"] if w["ready"]) == [0, 1], cluster


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.nginx
@pytest.mark.parametrize("site", CASES, indirect=True)
def test_every_client_gets_each_message_once_also_under_a_flood(
        site: Site, tmp_path: Path, closing: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # python-engineio's client aborts a long-poll answer of more than 16 packets ("Unexpected
    # packet from server"; python-engineio#142, a guard it shares with its server): a flood
    # queues hundreds between two polls. socket.io-client has no such limit.
    monkeypatch.setattr(engineio.payload.Payload, "max_decode_packets", 10 * FLOOD)
    py = _py_clients(site, closing)
    node = _node(site, tmp_path, closing)
    js_workers = {c["where"]["slot"] for c in node.status()}
    assert js_workers == {0, 1}, js_workers  # nginx's pool spread them
    # Long-polling through nginx: every poll of a session reached the worker holding it.
    for c in py[:2]:
        assert {c.ask_where()["pid"] for _ in range(3)} == {c.where["pid"]}
    _warm_up(py, node)

    senders: list[PyClient | tuple[NodeClients, str]] = [*py, *((node, k) for k in JS_KINDS)]
    for sender in senders:
        text = _nonce("once")
        _say(sender, text)
        py_counts, js_counts = _each_once(py, node, text)
        assert py_counts == [1] * len(py), (sender, text, py_counts)
        assert js_counts == [1] * len(js_counts), (sender, text, js_counts)

    # Bad input: the error is in the ack, and nothing reaches anyone.
    before = [sum(c.got.values()) for c in py]
    for bad in ({"txt": "no"}, "text", {"text": " "}, {"text": "x" * 5000}, [1, 2]):
        ack = py[0].sio.call("say", bad, namespace="/chat", timeout=TIMEOUT)
        assert "error" in ack, (bad, ack)
    text = _nonce("after-bad")
    _say(py[0], text)
    assert _each_once(py, node, text)[0] == [1] * len(py)
    assert [sum(c.got.values()) for c in py] == [n + 1 for n in before]

    # A flood from one client: FLOOD says at once, each fanned out to both workers.
    pids = set(site.gunicorn.worker_pids())
    prefix = _nonce("flood")
    flooded = node.command("flooded", timeout=60, cmd="flood", kind="websocket", text=prefix,
                           n=FLOOD)
    assert flooded.get("failed") == 0, flooded

    def all_in() -> list[dict[str, Any]] | None:
        counts: list[dict[str, Any]] = node.command("counts", cmd="counts", prefix=prefix)["clients"]
        py_done = all(sum(n for t, n in c.got.items() if t.startswith(prefix)) >= FLOOD for c in py)
        return counts if py_done and all(c["total"] >= FLOOD for c in counts) else None

    with contextlib.suppress(Exception):
        wait_for(all_in, 30, interval=0.5, what="the flood delivered")
    time.sleep(DUPLICATE_WINDOW)
    counts = node.command("counts", cmd="counts", prefix=prefix)["clients"]
    for c in counts:
        assert (c["distinct"], c["total"]) == (FLOOD, FLOOD), (c, site.logs())
    for c in py:
        mine = {t: n for t, n in c.got.items() if t.startswith(prefix)}
        assert len(mine) == FLOOD and set(mine.values()) == {1}, (c, len(mine))
    _bus_intact(site, pids)
    text = _nonce("after-flood")
    _say(py[0], text)
    assert _each_once(py, node, text) == ([1] * len(py), [1] * sum(JS_KINDS.values()))


@pytest.mark.slow
@pytest.mark.nginx
@pytest.mark.parametrize("site", CASES, indirect=True)
def test_a_killed_workers_clients_reconnect_and_the_others_never_notice(
        site: Site, tmp_path: Path, closing: list[Any]) -> None:
    py = _py_clients(site, closing, reconnection=True)
    node = _node(site, tmp_path, closing)
    _warm_up(py, node)
    victim, dead_pid, js_dead, js_alive, py_dead, py_alive = _split_by_victim(py, node)

    os.kill(dead_pid, signal.SIGKILL)
    # While the slot is down (and until its clients are back), the other worker's
    # clients get every message, once.
    survivor = next(c for c in py_alive if c.transport == "websocket")
    for n in range(3):
        text = _nonce(f"during-{n}")
        _say(survivor, text)
        wait_for(lambda t=text: all(c.count(t) for c in py_alive), TIMEOUT, what=text)
        time.sleep(0.2)
        py_counts = [c.count(text) for c in py_alive]
        assert py_counts == [1] * len(py_alive), (text, py_counts)
        wait_for(lambda t=text: all(c["received"].get(t, 0) for c in node.status()
                                    if c["id"] in js_alive), TIMEOUT, what=f"{text} in node")
        js = {c["id"]: c["received"].get(text, 0) for c in node.status()}
        assert all(js[cid] == 1 for cid in js_alive), js

    wait_for(_back_elsewhere(node, dead_pid, js_dead, py_dead), RECONNECT_WITHIN, interval=0.2,
             what=f"every client back\n{site.logs()}")
    after = {c["id"]: c for c in node.status()}
    # The survivors' clients never noticed: one connection each, all along.
    assert all(len(after[cid]["connects"]) == 1 and not after[cid]["disconnects"]
               for cid in js_alive), {cid: after[cid] for cid in js_alive}
    assert all(c.connects == 1 for c in py_alive)
    for c in py:
        if c.where["pid"] == dead_pid:
            c.where = wait_for(lambda c=c: _where_or_none(c), TIMEOUT, what=f"{c} answering")
            assert c.where["pid"] != dead_pid
    assert set(site.gunicorn.worker_pids()) != {dead_pid} and dead_pid not in site.gunicorn.worker_pids()
    _warm_up(py, node)
    for sender in (py[0], (node, "polling"), victim):
        text = _nonce("after")
        _say(sender, text)
        py_counts, js_counts = _each_once(py, node, text)
        assert py_counts == [1] * len(py), (sender, text, py_counts)
        assert js_counts == [1] * len(js_counts), (sender, text, js_counts)


def _where_or_none(c: PyClient) -> dict[str, Any] | None:
    try:
        return c.ask_where()
    except socketio.exceptions.SocketIOError:
        return None


@pytest.mark.slow
def test_the_raw_websocket_chat_under_gevent(gunicorn_factory: Callable[..., Gunicorn],
                                             tmp_path: Path) -> None:
    """The Flask example's other chat, ``/ws`` (simple-websocket), a greenlet per client:
    each message once on both workers; a stopping worker closes its clients at once."""
    where = EXAMPLES / "flask_app"
    base = free_port_pair()
    g = gunicorn_factory("app:app", config=where / "cluster_conf.py", cwd=where, workers=2,
                         env={"WORKER_CLASS": "gevent", "WORKER_PORTS_BASE": str(base),
                              "INSTANCE": "solo", "STATE_URL": f"sqlite:///{tmp_path / 's.db'}",
                              "SECRET_KEY": "k" * 32})
    wait_for(lambda: all(serves(base + slot) for slot in (0, 1)), 20, what="both worker ports")
    clients = [RawClient(f"ws://127.0.0.1:{base + slot}/ws") for slot in (0, 1, 0, 1)]
    try:
        assert [c.slot for c in clients] == [0, 1, 0, 1]
        for sender in clients[:2]:
            text = _nonce(f"raw-{sender.slot}")
            sender.send({"text": text})
            for c in clients:
                assert c.wait(lambda c=c, t=text: bool(c.texts(t))), (c, text)
            time.sleep(DUPLICATE_WINDOW)
            assert [len(c.texts(text)) for c in clients] == [1] * 4
        clients[0].send("not json")
        assert clients[0].wait(lambda: bool(clients[0].errors()))
        t0 = time.monotonic()
        g.signal(signal.SIGTTOU)  # gunicorn-ext stops the highest slot: 1
        for c in clients[1::2]:
            assert c.ended(TIMEOUT) and c.close_code == 1001, c.close_code
        assert time.monotonic() - t0 < TIMEOUT  # not graceful_timeout (10 s)
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()
