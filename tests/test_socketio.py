"""gunicorn_ext.socketio: python-socketio / Flask-SocketIO across workers.

A unit part (the managers, BusManager and AsyncBusManager, publish and listen through
the bus, their messages are msgpack values; async_mode() follows gevent) and a real part: Gunicorn with two gthread workers, websocket clients
on both, one broadcast reaching every client.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import socketio
from harness import free_port_pair, serves, wait_for

import gunicorn_ext
from gunicorn_ext.socketio import AsyncBusManager, BusManager, async_mode

APPS = Path(__file__).resolve().parent / "apps"


# ----------------------------------------------------------------------------- unit


def test_publishes_through_the_bus_as_msgpack(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(gunicorn_ext.worker, "publish", lambda topic, payload=None: sent.append((topic, payload)))
    mgr = BusManager(channel="sio-unit")

    mgr.emit("said", {"text": "hi", "n": [1, 2.5, None, True]}, namespace="/chat")
    mgr.emit("blob", (b"\x00\xff", "two"), namespace="/chat", room="r1", skip_sid="abc")
    mgr.close_room("r1", namespace="/chat")

    assert [topic for topic, _ in sent] == ["sio-unit"] * 3
    first, second, third = (payload for _, payload in sent)
    assert first["method"] == "emit" and first["event"] == "said"
    assert first["data"] == [{"text": "hi", "n": [1, 2.5, None, True]}]
    assert first["namespace"] == "/chat" and first["host_id"] == mgr.host_id
    assert second["binary"] is True and second["room"] == "r1"
    assert third["method"] == "close_room"
    for payload in (first, second, third):  # what the bus does to it: msgpack both ways
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(payload)) == payload


def test_publish_without_a_bus_logs_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    # Outside a worker the bus is closed: like RedisManager with Redis down, log and go on.
    mgr = BusManager(channel="sio-nobus")
    mgr._publish({"method": "emit"})
    assert "Cannot publish on the gunicorn-ext bus" in caplog.text


def test_listen_yields_what_the_bus_delivers() -> None:
    channel = "sio-unit-listen"
    mgr = BusManager(channel=channel)
    bus = gunicorn_ext.worker
    try:
        gen = mgr._listen()
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(next(gen)), daemon=True)
        t.start()  # subscribes, then blocks on the queue
        deadline = time.monotonic() + 5
        while channel not in bus._subscribers.topics and time.monotonic() < deadline:
            time.sleep(0.01)
        handlers = bus._subscribers.topics[channel]
        assert len(handlers) == 1
        handlers[0](gunicorn_ext.Message(channel, {"method": "emit", "x": 1}, 0))
        t.join(5)
        assert got == [{"method": "emit", "x": 1}]
        mgr._subscribe()  # a restarted _listen does not subscribe twice
        assert len(bus._subscribers.topics[channel]) == 1
    finally:
        bus.unsubscribe(channel)


def test_async_manager_publishes_with_apublish(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, Any]] = []

    async def apublish(topic: str, payload: Any = None) -> None:
        sent.append((topic, payload))

    monkeypatch.setattr(gunicorn_ext.worker, "apublish", apublish)
    mgr = AsyncBusManager(channel="asio-unit")
    asyncio.run(mgr.close_room("r1", namespace="/chat"))
    assert sent == [("asio-unit", {"method": "close_room", "room": "r1", "namespace": "/chat",
                                   "host_id": mgr.host_id})]


def test_async_publish_without_a_bus_logs_instead_of_raising(
        caplog: pytest.LogCaptureFixture) -> None:
    mgr = AsyncBusManager(channel="asio-nobus")
    asyncio.run(mgr._publish({"method": "emit"}))
    assert "Cannot publish on the gunicorn-ext bus" in caplog.text


def test_async_listen_yields_in_order_what_the_async_subscriber_gets() -> None:
    channel = "asio-unit-listen"
    mgr = AsyncBusManager(channel=channel)
    bus = gunicorn_ext.worker

    async def scenario() -> list[Any]:
        gen = mgr._listen()
        first = asyncio.ensure_future(gen.__anext__())  # subscribes, then waits on its queue
        await asyncio.sleep(0)
        (subscriber,) = bus._subscribers.topics[channel]
        assert inspect.iscoroutinefunction(subscriber)  # the bus runs it on its loop
        for n in range(3):
            await subscriber(gunicorn_ext.Message(channel, {"method": "emit", "n": n}, 0))
        got = [await first, await gen.__anext__(), await gen.__anext__()]
        mgr._subscribe()  # once per manager
        assert len(bus._subscribers.topics[channel]) == 1
        await gen.aclose()
        return got

    try:
        assert asyncio.run(scenario()) == [{"method": "emit", "n": n} for n in range(3)]
    finally:
        bus.unsubscribe(channel)


def test_async_mode_follows_gevent_patching() -> None:
    # This process is not patched (patching it would patch the test run): threading.
    assert async_mode() == "threading"
    out = subprocess.run(
        [sys.executable, "-c", "from gevent import monkey; monkey.patch_all()\n"
         "from gunicorn_ext.socketio import async_mode; print(async_mode())"],
        capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "gevent"


# ----------------------------------------------------------------------------- real

# Connections on the shared port go wherever the kernel hands them: one at a time,
# nearly all to the same (just idle again) worker. So clients also connect to each
# worker's own port (gunicorn-ext's per-worker ports), which puts them on both for sure.
# Each websocket holds one of a worker's 8 gthread threads: at most 6 clients here.
PER_WORKER_PORT = 2
ON_SHARED_PORT = 2


class _Client:
    def __init__(self, url: str) -> None:
        self.said: list[Any] = []
        self.got = threading.Event()
        self.sio = socketio.Client(reconnection=False)

        @self.sio.on("said", namespace="/chat")
        def _said(data: Any) -> None:
            self.said.append(data)
            self.got.set()

        self.sio.connect(url, transports=["websocket"], namespaces=["/chat"], wait_timeout=5)
        self.where: dict[str, int] = self.sio.call("where", namespace="/chat", timeout=5)


@pytest.mark.slow
def test_broadcast_reaches_clients_on_every_worker(gunicorn_factory: Any) -> None:
    base = free_port_pair()
    server = gunicorn_factory("sio_app:app", config=APPS / "sio_conf.py", cwd=APPS, workers=2,
                              env={"WORKER_PORTS_BASE": str(base)})
    assert server.bind.startswith("127.0.0.1:")
    wait_for(lambda: all(serves(base + s) for s in (0, 1)), 15, what="both worker ports")
    clients: list[_Client] = []
    try:
        for slot in (0, 1):
            for _ in range(PER_WORKER_PORT):
                clients.append(_Client(f"http://127.0.0.1:{base + slot}"))
                assert clients[-1].where["slot"] == slot
        for _ in range(ON_SHARED_PORT):
            clients.append(_Client(f"http://{server.bind}"))
        assert {c.where["slot"] for c in clients} == {0, 1}

        sender = clients[0]
        sender.sio.emit("say", {"text": "hello", "from": sender.where["slot"]}, namespace="/chat")
        for c in clients:
            assert c.got.wait(5), f"client on slot {c.where['slot']} got nothing"
        time.sleep(0.3)  # room for a duplicate to show up
        for c in clients:
            assert c.said == [{"text": "hello", "from": sender.where["slot"]}]

        # and the other way round, from a client of the other worker
        other = next(c for c in clients if c.where["slot"] != sender.where["slot"])
        for c in clients:
            c.got.clear()
        other.sio.emit("say", {"text": "back"}, namespace="/chat")
        for c in clients:
            assert c.got.wait(5), f"client on slot {c.where['slot']} got nothing"
        time.sleep(0.3)
        for c in clients:
            assert c.said[1:] == [{"text": "back"}]
    finally:
        for c in clients:
            c.sio.disconnect()
