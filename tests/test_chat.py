"""The example's chat (examples/flask_app/chat.py) with real parts.

A raw WebSocket chat at ``/ws`` and a Socket.IO namespace ``/chat``, served by real
Gunicorn (2 gthread workers per instance): with the SQLite default the messages go
over the gunicorn-ext bus (one instance); with ``STATE_URL=redis://...`` over a real
redis-server, to two instances behind a real nginx. Each worker also listens on its
own port (``WORKER_PORTS_BASE``), so clients are put on every worker for sure; the
clients are websocket-client (raw) and python-socketio, and in node the JavaScript
clients users ship (``tests/js``: socket.io-client on long-polling, websocket and its
default upgrade; ws on ``/ws``), through nginx only, pinned by the config's route cookie.
Every check is that each client receives each message exactly once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import requests
import socketio
import websocket
from harness import (
    Gunicorn,
    HarnessError,
    RedisServer,
    free_port,
    free_port_pair,
    serves,
    tail,
    wait_for,
)

from gunicorn_ext.nginx import render

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app"
TIMEOUT = 5.0  # any single wait for a frame, an ack, a connection
DUPLICATE_WINDOW = 0.5  # how long a duplicate gets to show up


def _load_chat() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_chat", EXAMPLE / "chat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chat = _load_chat()


# ----------------------------------------------------------------------------- unit


@pytest.mark.parametrize("frame, error", [
    ("nope", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('"text"', "JSON object"),
    ('{"message": "hi"}', '"text"'),
    ('{"text": 5}', '"text"'),
    ('{"text": "   "}', '"text"'),
    (b'{"text": "hi"}', "text frame"),
    (json.dumps({"text": "x" * chat.MAX_MESSAGE}), "too large"),
    (json.dumps({"text": "\u00e9" * (chat.MAX_MESSAGE // 2)}), "too large"),  # bytes, not chars
])
def test_bad_frames_are_refused_with_a_reason(frame: str | bytes, error: str) -> None:
    with pytest.raises(chat.BadMessage, match=error):
        chat.parse_message(frame)


def test_a_good_frame_gives_its_text() -> None:
    assert chat.parse_message('{"text": "hello \u00e9", "extra": 1}') == "hello \u00e9"


def test_a_client_that_stops_reading_is_cut_off() -> None:
    # Its thread is stuck in send() on a full socket buffer and never looks at its
    # queue: once MAX_BACKLOG messages pile up, the socket is shut down, which fails
    # that send, so the thread (and its place) is freed.
    import socket

    ours, theirs = socket.socketpair()  # "theirs" never reads
    ours.settimeout(20)
    client = chat._Client()
    client.sock = ours
    outcome: list[BaseException | None] = []

    def stuck_send() -> None:
        try:
            while True:
                ours.sendall(b"x" * 65536)
        except OSError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=stuck_send, daemon=True)
    sender.start()
    time.sleep(0.2)
    assert sender.is_alive()  # blocked: the buffer is full
    started = time.monotonic()
    for i in range(chat.MAX_BACKLOG + 1):
        client.push(f"message {i}")
    assert client.too_slow
    sender.join(chat.CLOSE_WAIT + 5)
    assert not sender.is_alive() and outcome and not isinstance(outcome[0], TimeoutError)
    assert time.monotonic() - started >= chat.CLOSE_WAIT - 0.1  # first its chance to close
    ours.close()
    theirs.close()


def test_the_fanout_follows_the_state_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHAT_URL", raising=False)
    assert chat.chat_url("sqlite:////tmp/x.db") is None
    assert chat.chat_url("memory://") is None
    for url in ("redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///run/redis.sock?db=2"):
        assert chat.chat_url(url) == url
    with pytest.raises(ValueError, match="set CHAT_URL"):
        chat.chat_url("redis+sentinel://h:26379,h:26380/mymaster")
    with pytest.raises(ValueError, match="set CHAT_URL"):
        chat.chat_url("redis+cluster://h:7000")
    monkeypatch.setenv("CHAT_URL", "redis://10.0.0.1:6379/0")
    assert chat.chat_url("redis+sentinel://h:26379/mymaster") == "redis://10.0.0.1:6379/0"
    monkeypatch.setenv("CHAT_URL", "bus")
    assert chat.chat_url("redis://127.0.0.1:6379/0") is None
    monkeypatch.setenv("CHAT_URL", "sqlite:///x.db")
    with pytest.raises(ValueError, match="CHAT_URL must be"):
        chat.chat_url("redis://127.0.0.1:6379/0")


# ----------------------------------------------------------------------------- clients


class RawClient:
    """A websocket-client connection to ``/ws``; a reader thread collects its frames."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws = websocket.create_connection(url, timeout=TIMEOUT)
        hello = json.loads(self.ws.recv())
        assert hello["type"] == "hello", hello
        self.slot: int = hello["slot"]
        self.instance: str = hello["instance"]
        self.pid: int = hello["pid"]
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._cond = threading.Condition()
        self._stop = False
        self.ws.settimeout(0.2)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close_code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                break
            if opcode == websocket.ABNF.OPCODE_TEXT:
                with self._cond:
                    self.frames.append(json.loads(data))
                    self._cond.notify_all()
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def send(self, body: Any) -> None:
        self.ws.send(body if isinstance(body, str) else json.dumps(body))

    def texts(self, text: str) -> list[dict[str, Any]]:
        with self._cond:
            return [f for f in self.frames if f.get("type") == "message" and f["text"] == text]

    def errors(self) -> list[str]:
        with self._cond:
            return [f["error"] for f in self.frames if f.get("type") == "error"]

    def wait(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def ended(self, timeout: float = TIMEOUT) -> bool:
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def close(self) -> None:
        self._stop = True
        self._reader.join(2)
        try:
            self.ws.close(timeout=1)
        except (websocket.WebSocketException, OSError):
            pass

    def __repr__(self) -> str:
        return f"<RawClient {self.instance} slot {self.slot} via {self.url}>"


class SioClient:
    """A python-socketio client on ``/chat`` (websocket transport)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.said: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.sio = socketio.Client(reconnection=False)

        @self.sio.on("said", namespace="/chat")
        def _said(data: Any) -> None:
            with self._cond:
                self.said.append(data)
                self._cond.notify_all()

        self.sio.connect(url, transports=["websocket"], namespaces=["/chat"],
                         wait_timeout=TIMEOUT)
        where = self.sio.call("where", namespace="/chat", timeout=TIMEOUT)
        assert set(where) == {"slot", "pid", "instance"}, where
        self.slot: int = where["slot"]
        self.instance: str = where["instance"]

    def say(self, text: str) -> dict[str, Any]:
        ack: dict[str, Any] = self.sio.call("say", {"text": text}, namespace="/chat",
                                            timeout=TIMEOUT)
        return ack

    def texts(self, text: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.said if m["text"] == text]

    def wait(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        self.sio.disconnect()

    def __repr__(self) -> str:
        return f"<SioClient {self.instance} slot {self.slot} via {self.url}>"


Client = RawClient | SioClient


def _nonce(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def _has(client: Client, text: str) -> bool:
    return bool(client.texts(text))


def _has_probe(client: SioClient) -> bool:
    return any(m["text"].startswith("probe-") for m in client.said)


def _send(sender: Client, text: str) -> None:
    if isinstance(sender, RawClient):
        sender.send({"text": text})
    else:
        assert "id" in sender.say(text)


def _assert_each_gets_it_once(clients: Sequence[Client], sender: Client, text: str) -> None:
    _send(sender, text)
    for c in clients:
        assert c.wait(partial(_has, c, text)), f"{c} never got {text!r}"
    time.sleep(DUPLICATE_WINDOW)
    for c in clients:
        got = c.texts(text)
        assert len(got) == 1, (c, got)
        assert (got[0]["slot"], got[0]["instance"]) == (sender.slot, sender.instance), got


def _warm_up(clients: list[SioClient]) -> None:
    """python-socketio subscribes a worker to the bus or Redis from a thread started by
    the worker's first client, so the first emits can beat the subscription: send
    probes until every client has seen one (what each test checks comes after)."""
    deadline = time.monotonic() + 10
    n = 0
    while True:
        clients[0].say(f"probe-{n}")
        n += 1
        if all(c.wait(partial(_has_probe, c), 0.3) for c in clients):
            return
        assert time.monotonic() < deadline, [c for c in clients if not c.said]


@pytest.fixture
def closing() -> Iterator[list[Client]]:
    """Clients appended here are closed at teardown, before the servers stop."""
    clients: list[Client] = []
    yield clients
    for c in clients:
        try:
            c.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- servers


def _distinct_bases(n: int) -> list[int]:
    bases: list[int] = []
    while len(bases) < n:
        b = free_port_pair()
        if all(abs(b - other) > 1 for other in bases):
            bases.append(b)
    return bases


def _example(factory: Callable[..., Gunicorn], base: int, instance: str, state_url: str,
             **env: str) -> Gunicorn:
    g = factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2,
                name=f"gunicorn-{instance}",
                env={"WORKER_PORTS_BASE": str(base), "INSTANCE": instance,
                     "STATE_URL": state_url, "SECRET_KEY": "k" * 32, **env})
    wait_for(lambda: all(serves(base + slot) for slot in (0, 1)), 15,
             what=f"the worker ports of {instance}")
    return g


C = TypeVar("C", RawClient, SioClient)


def _on_every_worker(make: Callable[[str], C], ports: dict[tuple[str, int], int],
                     closing: list[Client], per_worker: int = 1) -> list[C]:
    clients: list[C] = []
    for (instance, slot), port in ports.items():
        for _ in range(per_worker):
            c = make(f"127.0.0.1:{port}")
            closing.append(c)
            assert (c.instance, c.slot) == (instance, slot), c
            clients.append(c)
    return clients


def _raw(hostport: str) -> RawClient:
    return RawClient(f"ws://{hostport}/ws")


def _sio(hostport: str) -> SioClient:
    return SioClient(f"http://{hostport}")


# ----------------------------------------------------------------------------- bus


@pytest.mark.slow
def test_raw_chat_reaches_every_worker_once_over_the_bus(
        gunicorn_factory: Callable[..., Gunicorn], tmp_path: Path, closing: list[Client]) -> None:
    base = free_port_pair()
    g = _example(gunicorn_factory, base, "solo", f"sqlite:///{tmp_path / 'state.db'}")
    ports = {("solo", 0): base, ("solo", 1): base + 1}
    clients = _on_every_worker(_raw, ports, closing, per_worker=2)
    for _ in range(2):  # wherever the kernel puts them
        clients.append(_raw(g.bind))
        closing.append(clients[-1])

    by_slot = {s: next(c for c in clients if c.slot == s) for s in (0, 1)}
    _assert_each_gets_it_once(clients, by_slot[0], _nonce("from-0"))
    _assert_each_gets_it_once(clients, by_slot[1], _nonce("from-1"))
    assert all(c.errors() == [] for c in clients)

    # A worker told to stop closes its chat clients at once (1001: reconnect) instead of
    # holding its exit for graceful_timeout; the others keep chatting.
    pid = next(c for c in clients if c.slot == 1).pid
    t0 = time.monotonic()
    g.signal(signal.SIGTTOU)  # gunicorn-ext stops the highest slot: 1
    gone = [c for c in clients if c.slot == 1]
    for c in gone:
        assert c.ended(TIMEOUT), f"{c} still open"
        assert c.close_code == 1001, c.close_code
    assert time.monotonic() - t0 < TIMEOUT
    wait_for(lambda: pid not in g.worker_pids(), TIMEOUT, what="slot 1 to exit")
    stay = [c for c in clients if c.slot == 0]
    _assert_each_gets_it_once(stay, stay[0], _nonce("after"))


@pytest.mark.slow
def test_socketio_reaches_every_worker_once_over_the_bus(
        gunicorn_factory: Callable[..., Gunicorn], tmp_path: Path, closing: list[Client]) -> None:
    base = free_port_pair()
    g = _example(gunicorn_factory, base, "solo", f"sqlite:///{tmp_path / 'state.db'}")
    clients = _on_every_worker(_sio, {("solo", 0): base, ("solo", 1): base + 1}, closing,
                               per_worker=2)
    clients.append(_sio(g.bind))
    closing.append(clients[-1])
    _warm_up(clients)
    _assert_each_gets_it_once(clients, clients[0], _nonce("sio-0"))
    _assert_each_gets_it_once(clients, next(c for c in clients if c.slot == 1), _nonce("sio-1"))

    # Bad input: the error is in the ack, and nothing is broadcast.
    before = [len(c.said) for c in clients]
    for bad in ({"txt": "no"}, "text", {"text": ""}, {"text": "x" * 5000}):
        ack = clients[0].sio.call("say", bad, namespace="/chat", timeout=TIMEOUT)
        assert "error" in ack, (bad, ack)
    _assert_each_gets_it_once(clients, clients[0], _nonce("after-bad"))
    for c, n in zip(clients, before, strict=True):
        assert len(c.said) == n + 1, c.said[n:]
        assert len(c.said) == len({m["id"] for m in c.said}), c.said  # no duplicate at all

    # A stopping worker drops its Socket.IO clients' transports at once (they would
    # reconnect) instead of waiting graceful_timeout (10 s) for them.
    pid = next(c for c in clients if c.slot == 1).sio.call("where", namespace="/chat")["pid"]
    g.signal(signal.SIGTTOU)
    wait_for(lambda: pid not in g.worker_pids(), TIMEOUT, what="slot 1 to exit")
    for c in clients:
        if c.slot == 1:
            wait_for(lambda c=c: not c.sio.connected, TIMEOUT, what=f"{c} to be dropped")
    stay = [c for c in clients if c.slot == 0]
    _assert_each_gets_it_once(stay, stay[0], _nonce("after"))


@pytest.mark.slow
def test_bad_input_gets_an_error_and_is_never_broadcast(
        gunicorn_factory: Callable[..., Gunicorn], tmp_path: Path, closing: list[Client]) -> None:
    base = free_port_pair()
    _example(gunicorn_factory, base, "solo", f"sqlite:///{tmp_path / 'state.db'}",
             CHAT_MAX_CLIENTS="1")
    sender, listener = _raw(f"127.0.0.1:{base}"), _raw(f"127.0.0.1:{base + 1}")
    closing += [sender, listener]

    bad: list[str | bytes] = ["nope", "[1, 2]", '{"message": "hi"}', '{"text": 7}',
                              '{"text": ""}', json.dumps({"text": "x" * 5000})]
    for frame in bad:
        sender.send(frame)
    sender.ws.send_binary(b'{"text": "binary"}')
    assert sender.wait(lambda: len(sender.errors()) == len(bad) + 1), sender.frames
    errors = sender.errors()
    for needle in ("not JSON", "JSON object", '"text"', "too large", "text frame"):
        assert any(needle in e for e in errors), (needle, errors)

    good = _nonce("good")
    sender.send({"text": good})
    assert listener.wait(lambda: bool(listener.texts(good)))
    time.sleep(DUPLICATE_WINDOW)
    # Only the good message ever reached anyone; errors went to the sender only.
    assert [f["text"] for f in listener.frames if f["type"] == "message"] == [good]
    assert listener.errors() == []
    assert [f["text"] for f in sender.frames if f["type"] == "message"] == [good]

    # CHAT_MAX_CLIENTS=1: the worker's one place is taken...
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{base}/ws", timeout=TIMEOUT)
    assert refused.value.status_code == 503
    # ...a plain GET is not a WebSocket...
    plain = requests.get(f"http://127.0.0.1:{base}/ws", timeout=TIMEOUT)
    assert plain.status_code == 400 and "WebSocket" in plain.json()["error"]
    # ...a frame over the hard limit closes that connection...
    sender.ws.send("y" * (chat.MAX_FRAME + 1))
    assert sender.ended(TIMEOUT)
    assert sender.close_code in (None, 1009), sender.close_code
    # ...and its place is given back, so the next client gets in.
    again = wait_for(lambda: _try_raw(f"127.0.0.1:{base}"), TIMEOUT, what="a free place")
    closing.append(again)
    assert again.slot == 0
    time.sleep(DUPLICATE_WINDOW)
    assert [f["text"] for f in listener.frames if f["type"] == "message"] == [good]


def _try_raw(hostport: str) -> RawClient | None:
    try:
        return _raw(hostport)
    except websocket.WebSocketBadStatusException:
        return None


# ----------------------------------------------------------------------------- redis


def _two_instances(factory: Callable[..., Gunicorn], redis_url: str,
                   listen: int) -> tuple[list[Gunicorn], dict[tuple[str, int], int]]:
    bases = _distinct_bases(2)
    origin = f"http://127.0.0.1:{listen}"  # nginx passes Host without the port
    instances = [_example(factory, base, name, redis_url, CHAT_ALLOWED_ORIGINS=origin)
                 for name, base in zip(("east", "west"), bases, strict=True)]
    ports = {(name, slot): base + slot
             for name, base in zip(("east", "west"), bases, strict=True) for slot in (0, 1)}
    return instances, ports


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.nginx
def test_raw_chat_reaches_every_worker_of_two_instances_through_redis_and_nginx(
        gunicorn_factory: Callable[..., Gunicorn], redis_server: RedisServer,
        nginx_site: Callable[..., Any],
        closing: list[Client]) -> None:
    listen = free_port()
    _, ports = _two_instances(gunicorn_factory, redis_server.url, listen)
    clients = _on_every_worker(_raw, ports, closing)
    conf = render(backends=[f"127.0.0.1:{p}" for p in ports.values()], listen=listen,
                  server_name="127.0.0.1", default_server=False)
    with nginx_site(conf, listen):
        for _ in range(3):  # through nginx's /ws location, to any worker of either instance
            clients.append(_raw(f"127.0.0.1:{listen}"))
            closing.append(clients[-1])
        assert {(c.instance, c.slot) for c in clients} == set(ports)
        for sender in (clients[0], clients[3], clients[-1]):  # east 0, west 1, via nginx
            _assert_each_gets_it_once(clients, sender, _nonce(f"{sender.instance}-{sender.slot}"))
        assert all(c.errors() == [] for c in clients)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.nginx
def test_socketio_reaches_every_worker_of_two_instances_through_redis_and_nginx(
        gunicorn_factory: Callable[..., Gunicorn], redis_server: RedisServer,
        nginx_site: Callable[..., Any],
        closing: list[Client]) -> None:
    listen = free_port()
    _, ports = _two_instances(gunicorn_factory, redis_server.url, listen)
    clients = _on_every_worker(_sio, ports, closing)
    conf = render(backends=[f"127.0.0.1:{p}" for p in ports.values()], listen=listen,
                  server_name="127.0.0.1", default_server=False)
    with nginx_site(conf, listen):
        for _ in range(2):
            clients.append(_sio(f"127.0.0.1:{listen}"))
            closing.append(clients[-1])
        assert {(c.instance, c.slot) for c in clients} == set(ports)
        _warm_up([c for c in clients if isinstance(c, SioClient)])
        for sender in (clients[0], clients[3], clients[-1]):
            _assert_each_gets_it_once(clients, sender, _nonce(f"{sender.instance}-{sender.slot}"))


@pytest.mark.slow
@pytest.mark.redis
def test_raw_chat_resubscribes_after_redis_comes_back(
        gunicorn_factory: Callable[..., Gunicorn], redis_server: RedisServer,
        closing: list[Client]) -> None:
    base = free_port_pair()
    g = _example(gunicorn_factory, base, "solo", redis_server.url)
    clients = _on_every_worker(_raw, {("solo", 0): base, ("solo", 1): base + 1}, closing)
    _assert_each_gets_it_once(clients, clients[0], _nonce("before"))

    redis_server.kill()
    g.wait_log("chat: Redis pub/sub on", timeout=TIMEOUT)
    clients[0].send({"text": "lost"})  # cannot be published: the sender is told
    assert clients[0].wait(lambda: "chat unavailable, not sent" in clients[0].errors())
    redis_server.start()
    wait_for(lambda: g.log_text().count("is back (slot") >= 2, 15,
             what="both workers' subscribers back")
    _assert_each_gets_it_once(clients, clients[1], _nonce("after"))
    assert all(not c.texts("lost") for c in clients)


# ----------------------------------------------------------------------------- node clients

JS = Path(__file__).resolve().parent / "js"
JS_READY = 30.0  # every node client connected, through nginx, on a loaded machine
RECONNECT_WITHIN = 10.0  # after the SIGKILL of an instance, each client is back within this
#: Clients of each kind: socket.io-client on long-polling only, on websocket only, with
#: its default (polling, upgraded to websocket), and ws on the raw /ws chat.
JS_KINDS = {"polling": 6, "websocket": 6, "upgrade": 6, "raw": 6}
SIO_KINDS = ("polling", "websocket", "upgrade")
#: The transport each kind ends up on.
TRANSPORT = {"polling": "polling", "websocket": "websocket", "upgrade": "websocket"}
#: Who receives a message sent by a client of each kind: Socket.IO clients share the
#: namespace /chat whatever their transport; the raw chat is a channel of its own.
AUDIENCE = {"polling": SIO_KINDS, "websocket": SIO_KINDS, "upgrade": SIO_KINDS,
            "raw": ("raw",)}
#: One line per request nginx proxies: enough to tell which worker each Engine.IO
#: session's requests went to (appended to the rendered config, which is left as it is).
UPSTREAM_LOG = ("log_format gx_upstream '$request_method $request_uri $status "
                "$upstream_addr $cookie_gx_route';\naccess_log {path} gx_upstream;\n")


class NodeClients:
    """``tests/js/clients.js`` in node: socket.io-client and ws clients, one process.

    Commands go to its stdin and each answer is one JSON line on its stdout (see the
    script); its stderr goes to *log*.
    """

    def __init__(self, url: str, counts: dict[str, int], log: Path) -> None:
        node = shutil.which("node")
        if node is None or not (JS / "node_modules" / "socket.io-client").is_dir():
            pytest.fail("node or tests/js/node_modules missing: run `make js-deps` "
                        "(apt-get install nodejs npm; npm ci in tests/js)", pytrace=False)
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(
            [node, str(JS / "clients.js"), json.dumps({"url": url, **counts})], cwd=JS,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
            start_new_session=True)
        self.log = log
        self._events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._events.put(json.loads(line))
        self._events.put({"event": "exited"})

    def wait(self, event: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        try:
            got = self._events.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"node: no {event!r} within {timeout}s\n{self.log.read_text()[-3000:]}",
                        pytrace=False)
        assert got["event"] == event, (got, self.log.read_text()[-3000:])
        return got

    def ready(self, timeout: float) -> dict[str, Any]:
        """Wait for every client to be connected; else fail saying who is not, and why."""
        try:
            got = self._events.get(timeout=timeout)
        except queue.Empty:
            clients = self.status()
            counts = {k: f"{sum(c['connected'] for c in clients if c['kind'] == k)}/"
                         f"{sum(1 for c in clients if c['kind'] == k)}" for k in JS_KINDS}
            errors = sorted({e for c in clients for e in c["errors"]})[:5]
            pytest.fail(f"node clients not all connected after {timeout}s: {counts}; "
                        f"errors: {errors}", pytrace=False)
        assert got["event"] == "ready", (got, self.log.read_text()[-3000:])
        return got

    def command(self, answer: str, timeout: float = 3 * TIMEOUT, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.wait(answer, timeout)

    def status(self) -> list[dict[str, Any]]:
        clients: list[dict[str, Any]] = self.command("status", cmd="status")["clients"]
        return clients

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.command("bye", timeout=3, cmd="quit")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self._err.close()


def _broadcast(node: NodeClients, kind: str, tag: str) -> list[int]:
    """One uniquely tagged message from a client of *kind*: how many times each client of
    its audience got it (waits until all have it or TIMEOUT, then a moment for duplicates)."""
    text = _nonce(f"{tag}-{kind}")
    said = node.command("said", cmd="say", kind=kind, text=text)
    assert "error" not in said and "error" not in said.get("ack", {}), said
    audience = AUDIENCE[kind]

    def counts() -> list[int]:
        return [c["received"].get(text, 0) for c in node.status() if c["kind"] in audience]

    with contextlib.suppress(HarnessError):
        wait_for(lambda: all(counts()), TIMEOUT, interval=0.1, what=text)
    time.sleep(DUPLICATE_WINDOW)
    return counts()


def _warm_up_js(node: NodeClients) -> None:
    """python-socketio's Redis subscription starts with a worker's first client (see
    :func:`_warm_up`): probe until every Socket.IO client has seen one."""
    deadline = time.monotonic() + 10
    n = 0
    while True:
        text = f"probe-{n}-{uuid.uuid4().hex[:6]}"
        node.command("said", cmd="say", kind="websocket", text=text)
        n += 1
        time.sleep(0.3)
        clients = [c for c in node.status() if c["kind"] != "raw"]
        if all(any(t.startswith("probe-") for t in c["received"]) for c in clients):
            return
        assert time.monotonic() < deadline, [c["id"] for c in clients if not c["received"]]


def _sessions_on_one_worker(log: Path) -> tuple[dict[str, set[str]], int]:
    """Engine.IO sid -> the worker addresses nginx sent that session's requests to; and
    how many of those requests were refused (400: a worker that does not hold the sid)."""
    by_sid: dict[str, set[str]] = {}
    refused = 0
    for line in log.read_text().splitlines():
        method, uri, status, upstream, _ = (line.split(" ") + [""] * 5)[:5]
        m = re.search(r"[?&]sid=([\w-]+)", uri)
        if uri.startswith("/socket.io/") and m and upstream != "-":
            by_sid.setdefault(m[1], set()).update(a.strip() for a in upstream.split(","))
            refused += status == "400"
    return by_sid, refused


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.nginx
def test_js_clients_stay_pinned_get_each_message_once_and_reconnect_after_an_instance_dies(
        gunicorn_factory: Callable[..., Gunicorn], redis_server: RedisServer,
        nginx_site: Callable[..., Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The example as `make run` starts it, twice (2 workers each, per-worker ports, one
    redis-server), behind the nginx config `gunicorn-ext nginx render` gives, and the
    JavaScript clients users ship: socket.io-client on long-polling and on websocket,
    and ws on /ws. The example has no sticky code: the route cookie is the config's."""
    listen = free_port()
    instances, ports = _two_instances(gunicorn_factory, redis_server.url, listen)
    conf = render(backends=[f"127.0.0.1:{p}" for p in ports.values()], listen=listen,
                  server_name="127.0.0.1", default_server=False)
    upstream_log = tmp_path / "upstream.log"
    with nginx_site(UPSTREAM_LOG.format(path=upstream_log) + conf, listen) as ngx:
        node = NodeClients(f"http://127.0.0.1:{listen}", JS_KINDS, tmp_path / "node.log")
        try:
            _run_js_scenario(node, instances, ports, upstream_log, ngx, capsys)
        finally:
            node.close()


def _run_js_scenario(node: NodeClients, instances: list[Gunicorn],
                     ports: dict[tuple[str, int], int], upstream_log: Path, ngx: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    ready = node.ready(JS_READY)
    wait_for(lambda: all(c["transport"] == TRANSPORT[c["kind"]] for c in node.status()
                         if c["kind"] in SIO_KINDS), TIMEOUT, what="the upgrades to websocket")
    node.command("where", cmd="where", times=3)
    before = {c["id"]: c for c in node.status()}
    workers = {k: {(c["where"]["instance"], c["where"]["slot"]) for c in before.values()
                   if c["kind"] == k} for k in JS_KINDS}
    for kind, seen in workers.items():  # nginx's pool spread each kind over the workers
        assert len(seen) > 1 and {i for i, _ in seen} == {"east", "west"}, (kind, seen)
    # Pinned: one connection so far, and every `where` answered by the worker it opened on.
    pinned_before = {c["id"] for c in before.values() if len(c["connects"]) == 1
                     and not c["disconnects"] and c["transport"] == TRANSPORT.get(c["kind"])
                     and (c["kind"] == "raw" or c["wheres"] == [c["where"]["pid"]] * 3)}
    _warm_up_js(node)
    delivered_before = {kind: _broadcast(node, kind, "before") for kind in JS_KINDS}
    # Every request of every session that started on long-polling (polling, upgrade)
    # went to one worker, the one whose port the route cookie names (a websocket-only
    # session is one request, with no sid), and no worker saw a session it did not hold.
    by_sid, refused = _sessions_on_one_worker(upstream_log)

    # SIGKILL one instance: its clients reconnect through nginx to the other one.
    dead, dead_name = 0, "east"
    on_dead = {cid for cid, c in before.items() if c["where"]["instance"] == dead_name}
    killed_at = time.time() * 1000
    os.killpg(instances[dead].pgid, signal.SIGKILL)

    def all_back() -> list[dict[str, Any]] | None:
        now = node.status()
        back = all(c["connected"] and c["where"] and (c["id"] not in on_dead
                   or (len(c["connects"]) > 1 and c["where"]["instance"] != dead_name))
                   for c in now)
        return now if back else None

    after_list = wait_for(all_back, RECONNECT_WITHIN + 5, interval=0.1,
                          what=f"every client back\n{tail(ngx / 'error.log')}")
    reconnect_ms = {k: sorted(c["connects"][-1][0] - killed_at for c in after_list
                              if c["kind"] == k and c["id"] in on_dead) for k in JS_KINDS}
    untouched = {c["id"] for c in after_list
                 if c["id"] not in on_dead and len(c["connects"]) == 1 and not c["disconnects"]}
    node.command("where", cmd="where", times=3)
    after = {c["id"]: c for c in node.status()}
    alive_pids = set(instances[1 - dead].worker_pids())
    pinned_after = {c["id"] for c in after.values() if c["where"]["pid"] in alive_pids
                    and (c["kind"] == "raw" or c["wheres"][-3:] == [c["where"]["pid"]] * 3)}
    _warm_up_js(node)
    delivered_after = {kind: _broadcast(node, kind, "after") for kind in JS_KINDS}

    with capsys.disabled():
        print(f"\njs clients through nginx, 2 instances x 2 workers (all connected in "
              f"{ready['ms']} ms); {len(by_sid)} long-polling sessions, "
              f"{sum(len(a) == 1 for a in by_sid.values())} of them on one worker throughout, "
              f"{refused} requests refused")
        for kind, n in JS_KINDS.items():
            ids = {cid for cid, c in before.items() if c["kind"] == kind}
            times = reconnect_ms[kind] or [float("nan")]
            once = [sum(x == 1 for x in delivered_before[kind]), len(delivered_before[kind]),
                    sum(x == 1 for x in delivered_after[kind]), len(delivered_after[kind])]
            connected = sum(before[cid]["connected"] for cid in ids)
            print(f"  {kind:9}: connected {connected}/{n} on {len(workers[kind])} workers, "
                  f"pinned {len(ids & pinned_before)}/{n}; its message reached {once[0]}/"
                  f"{once[1]} exactly once | SIGKILL east: {len(ids & on_dead)} reconnected in "
                  f"{times[0]:.0f}..{times[-1]:.0f} ms (median {times[len(times) // 2]:.0f}), "
                  f"{len(ids & untouched)} untouched; pinned {len(ids & pinned_after)}/{n}; "
                  f"next message reached {once[2]}/{once[3]} exactly once")

    assert pinned_before == set(before), sorted(set(before) - pinned_before)
    assert len(by_sid) == JS_KINDS["polling"] + JS_KINDS["upgrade"], by_sid
    assert all(len(addrs) == 1 for addrs in by_sid.values()), by_sid
    assert refused == 0, refused
    for kind in JS_KINDS:
        assert delivered_before[kind] == [1] * len(delivered_before[kind]), (kind, delivered_before)
        assert delivered_after[kind] == [1] * len(delivered_after[kind]), (kind, delivered_after)
        assert reconnect_ms[kind] and max(reconnect_ms[kind]) <= RECONNECT_WITHIN * 1000, \
            (kind, reconnect_ms)
    assert on_dead and untouched == set(before) - on_dead  # the survivors' clients never noticed
    assert pinned_after == set(after), sorted(set(after) - pinned_after)
