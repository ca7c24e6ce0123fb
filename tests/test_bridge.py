"""The bus bridge (gunicorn_ext/ipc/bridge.py): publications across instances through Redis.

Real redis-server throughout. Two hubs in this process stand for two primaries in the
unit-level cases (exactly once, the primary told when the bridge is down, garbage from
Redis); the example (``examples/flask_app``, started as ``make run`` does, with
``STATE_URL`` a Redis URL) is the acceptance surface: ``POST /broadcast`` reaches the
``/inbox`` of every worker of every instance once, Socket.IO clients on every worker get
each message once, one Redis connection per primary (``CLIENT LIST``), and an outage
(redis-server killed) keeps local delivery going, tells the sender, logs one line at
loss and one at recovery, and heals by itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import requests
from harness import Gunicorn, RedisServer, _free_ports, find_binary, free_port, serves, wait_for
from logs import RecordingLog
from test_chat import SioClient, _assert_each_gets_it_once, _warm_up
from test_store_redis import PASSWORD, _answers, _process

import gunicorn_ext
from gunicorn_ext.ipc.bridge import CHANNEL_PREFIX, Envelope
from gunicorn_ext.ipc.hub import Hub
from gunicorn_ext.settings import Settings, SettingsError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app"
CHANNEL = CHANNEL_PREFIX + "app:app"  # the example's: Gunicorn's default proc_name
TIMEOUT = 10.0


# ----------------------------------------------------------------------------- settings


def test_the_bridge_settings_are_checked() -> None:
    for url in ("redis://h:6379/0", "rediss://h/1", "unix:///run/r.sock",
                "redis+sentinel://h:26379/mymaster", "rediss+cluster://h:7000", ""):
        assert Settings(bus_bridge_url=url).bus_bridge_url == url
    with pytest.raises(SettingsError, match="bus_bridge_url must be a Redis store URL") as err:
        Settings(bus_bridge_url="sqlite://user:hunter2@x/db")
    assert "hunter2" not in str(err.value)  # never echo a password
    with pytest.raises(SettingsError, match="bus_bridge_url"):
        Settings(bus_bridge_url=5)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="bus_bridge_name"):
        Settings(bus_bridge_name="a b")
    assert Settings(bus_bridge_name="shop.eu-1").bus_bridge_name == "shop.eu-1"


# ----------------------------------------------------------------------------- two hubs


class Primary:
    """A hub with its bridge, as in a Gunicorn arbiter; ``got`` collects a topic."""

    def __init__(self, url: str, name: str = "t", topic: str = "news") -> None:
        self.log = RecordingLog()
        self.hub = Hub()
        self.got: list[Any] = []
        self.hub.subscribe(topic)(lambda msg: self.got.append(msg.payload))
        self.hub.start(self.log)
        self.hub.start_bridge(url, name)

    def wait_up(self) -> None:
        wait_for(lambda: self.hub.bridge.up, TIMEOUT, what="the bridge to come up")

    def stop(self) -> None:
        self.hub.stop()


@pytest.fixture
def primaries(redis_server: RedisServer) -> Iterator[Callable[..., Primary]]:
    made: list[Primary] = []

    def make(url: str | None = None, **kw: Any) -> Primary:
        p = Primary(url or redis_server.url, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def _bridge_clients(redis_server: RedisServer, **kw: Any) -> list[dict[str, Any]]:
    return [c for c in redis_server.client(**kw).client_list()
            if c.get("name", "").startswith("gunicorn-ext-bridge")]


@pytest.mark.redis
def test_each_primary_gets_each_publication_once_over_one_connection(
        redis_server: RedisServer, primaries: Callable[..., Primary]) -> None:
    a, b, other = primaries(), primaries(), primaries(name="another-cluster")
    for p in (a, b, other):
        p.wait_up()
    for i in range(50):
        a.hub.publish("news", {"n": i, "from": "a"})
        b.hub.publish("news", {"n": i, "from": "b"})
    want = sorted([("a", i) for i in range(50)] + [("b", i) for i in range(50)])
    for p in (a, b):
        wait_for(lambda p=p: len(p.got) >= 100, TIMEOUT, what="100 publications")
    time.sleep(0.3)  # room for a duplicate to show up
    for p in (a, b):
        assert sorted((m["from"], m["n"]) for m in p.got) == want
    # Each sender's own publications kept their order (local delivery, not via Redis).
    assert [m["n"] for m in a.got if m["from"] == "a"] == list(range(50))
    assert other.got == []  # another cluster name, another channel
    clients = _bridge_clients(redis_server)
    assert len(clients) == 3, clients  # one per primary
    assert all(c["resp"] == "3" and int(c["sub"]) == 1 for c in clients), clients


@pytest.mark.redis
def test_a_bridge_outage_keeps_local_delivery_tells_the_sender_and_heals(
        redis_server: RedisServer, primaries: Callable[..., Primary]) -> None:
    a, b = primaries(), primaries()
    a.wait_up()
    b.wait_up()
    redis_server.kill()
    wait_for(lambda: not a.hub.bridge.up, TIMEOUT, what="a to see the bridge down")
    with pytest.raises(gunicorn_ext.BridgeDown, match="reached this instance only"):
        a.hub.publish("news", "during")
    wait_for(lambda: a.got == ["during"], TIMEOUT, what="local delivery during the outage")
    time.sleep(2.0)  # several reconnect attempts fail meanwhile
    assert a.log.count("is down") == 1, a.log.lines
    redis_server.start()
    a.wait_up()
    b.wait_up()
    assert a.log.count("is back after") == 1, a.log.lines
    assert "1 publications reached their own instance only" in "\n".join(
        t for _, t in a.log.lines)
    a.hub.publish("news", "after")
    wait_for(lambda: b.got == ["after"], TIMEOUT, what="the bridge to carry again")
    assert "during" not in b.got
    assert len(_bridge_clients(redis_server)) == 2


@pytest.mark.redis
def test_garbage_from_redis_is_dropped_with_a_log_line(
        redis_server: RedisServer, primaries: Callable[..., Primary]) -> None:
    a = primaries()
    a.wait_up()
    r = redis_server.client()
    enc = msgspec.msgpack.encode
    garbage = [
        b"not msgpack \xc1",
        enc(["g1", "origin", 5, 0, "topic is not a str"]),
        enc(["zz", "x", "news", 0, None]),  # unknown tag
        enc({"origin": "x"}),
        b"\x91" * 100_000 + b"\xc0",  # nested past any stack
        enc(Envelope("x", "news", 0, "y" * (5 << 20))),  # over ipc_max_frame
    ]
    for data in garbage:
        r.publish(CHANNEL_PREFIX + "t", data)
    r.publish(CHANNEL_PREFIX + "t", enc(Envelope("elsewhere", "news", 3, "fine")))
    wait_for(lambda: a.got == ["fine"], TIMEOUT, what="the good publication")
    wait_for(lambda: a.log.count("dropped a publication") == len(garbage), TIMEOUT,
             what="one log line per bad publication")
    assert a.hub.bridge.up and a.hub.bridge.dropped == len(garbage)
    a.hub.publish("news", "still fine")
    wait_for(lambda: a.got == ["fine", "still fine"], TIMEOUT, what="the hub to go on")


@pytest.mark.redis
def test_the_bridge_over_sentinel_with_a_password(
        redis_server: RedisServer, primaries: Callable[..., Primary], tmp_path: Path) -> None:
    binary = find_binary("redis-server")
    assert binary is not None
    redis_server.client().config_set("requirepass", PASSWORD)
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
        f"sentinel auth-pass mymaster {PASSWORD}\n")
    with _process([binary, str(conf), "--sentinel"], tmp_path / "sentinel.log") as proc:
        wait_for(lambda: proc.poll() is None and _answers(port), 10, what="sentinel")
        url = f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/mymaster/0"
        a, b = primaries(url=url), primaries(url=url)
        a.wait_up()
        b.wait_up()
        a.hub.publish("news", "via sentinel")
        wait_for(lambda: b.got == ["via sentinel"], TIMEOUT, what="the publication on b")
        assert a.got == ["via sentinel"]
        assert len(_bridge_clients(redis_server, password=PASSWORD)) == 2
        assert all(PASSWORD not in text for _, text in a.log.lines)


@pytest.mark.redis
def test_forks_while_the_bridge_is_busy_leave_it_alone(
        redis_server: RedisServer, primaries: Callable[..., Primary]) -> None:
    """Forking (as the arbiter does for every worker) parks the bridge thread; the child
    closes the connection's socket without shutting the parent's session down."""
    a, b = primaries(), primaries()
    a.wait_up()
    b.wait_up()
    fd = a.hub.bridge._conn._sock.fileno()
    count = 2000
    done = threading.Event()

    def flood() -> None:
        for i in range(count):
            a.hub.publish("news", i)
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # the child: no bridge, its socket closed; exit at once
            code = 0
            try:
                if a.hub.bridge is not None:
                    code = 2
                else:
                    try:
                        os.fstat(fd)
                        code = 3
                    except OSError:
                        pass
            finally:
                os._exit(code)
        deadline = time.monotonic() + TIMEOUT
        while True:  # bounded: a child stuck on a lock would fail here
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                assert os.waitstatus_to_exitcode(status) == 0
                break
            assert time.monotonic() < deadline, "a forked child hung"
            time.sleep(0.01)
    assert done.wait(TIMEOUT)
    wait_for(lambda: len(b.got) >= count, TIMEOUT, what="every publication on b")
    time.sleep(0.3)
    assert sorted(b.got) == list(range(count))
    assert a.hub.bridge.up and a.log.count("is down") == 0, a.log.lines
    assert len(_bridge_clients(redis_server)) == 2


# ----------------------------------------------------------------------------- the example


def _example(factory: Callable[..., Gunicorn], instance: str, state_url: str, workers: int,
             **env: str) -> tuple[Gunicorn, list[int]]:
    base = _free_ports("127.0.0.1", workers)
    g = factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=workers,
                name=f"gunicorn-{instance}",
                env={"WORKER_PORTS_BASE": str(base), "INSTANCE": instance,
                     "STATE_URL": state_url, "SECRET_KEY": "k" * 32, **env})
    ports = [base + slot for slot in range(workers)]
    wait_for(lambda: all(serves(p) for p in ports), 20, what=f"the worker ports of {instance}")
    g.wait_log("bus bridge up", timeout=TIMEOUT)
    return g, ports


def _inbox(port: int) -> list[Any]:
    r = requests.get(f"http://127.0.0.1:{port}/inbox", timeout=5)
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


def _broadcast(port: int, message: Any) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{port}/broadcast", json={"message": message},
                         timeout=10)


@pytest.fixture
def two_instances(gunicorn_factory: Callable[..., Gunicorn],
                  redis_server: RedisServer) -> tuple[list[Gunicorn], list[list[int]]]:
    east = _example(gunicorn_factory, "east", redis_server.url, 2)
    west = _example(gunicorn_factory, "west", redis_server.url, 3)
    return [east[0], west[0]], [east[1], west[1]]


@pytest.mark.slow
@pytest.mark.redis
def test_the_example_broadcasts_to_every_worker_of_every_instance_over_one_connection_each(
        redis_server: RedisServer, two_instances: tuple[list[Gunicorn], list[list[int]]],
        ) -> None:
    (east, west), (east_ports, west_ports) = two_instances
    every = east_ports + west_ports
    for sender in (east_ports[1], west_ports[2]):
        text = f"hello-{uuid.uuid4().hex[:8]}"
        r = _broadcast(sender, text)
        assert r.status_code == 202 and r.json()["delivered"] == "cluster", r.text
        for port in every:
            wait_for(lambda port=port, text=text: text in _inbox(port), TIMEOUT,
                     what=f"{text} on {port}")
        time.sleep(0.3)
        assert all(_inbox(port).count(text) == 1 for port in every)

    # Socket.IO over the bridge (the example's BusManager): a client on every worker
    # gets each message once, and Redis still holds one connection per primary.
    clients: list[SioClient] = []
    try:
        for port in every:
            clients.append(SioClient(f"http://127.0.0.1:{port}"))
        assert {(c.instance, c.slot) for c in clients} == (
            {("east", s) for s in range(2)} | {("west", s) for s in range(3)})
        _warm_up(clients)
        for sender in (clients[0], clients[4]):
            _assert_each_gets_it_once(clients, sender, f"sio-{uuid.uuid4().hex[:8]}")
        subscribers = [c for c in redis_server.client().client_list() if int(c["sub"]) > 0]
        assert len(subscribers) == 2, subscribers  # 5 workers, 2 primaries
        assert all(c["name"] == "gunicorn-ext-bridge:app:app" for c in subscribers)
        pids = {east.master_pid, west.master_pid}
        assert len(pids) == 2
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()

    # Garbage published on the example's channel is dropped; nothing else changes.
    redis_server.client().publish(CHANNEL, b"\x00garbage")
    for g in (east, west):
        g.wait_log("dropped a publication from Redis channel", timeout=TIMEOUT)
        assert g.alive()
    text = f"still-{uuid.uuid4().hex[:8]}"
    assert _broadcast(east_ports[0], text).status_code == 202
    wait_for(lambda: text in _inbox(west_ports[0]), TIMEOUT, what="the bridge after garbage")


@pytest.mark.slow
@pytest.mark.redis
def test_the_example_survives_a_redis_outage_and_heals_by_itself(
        redis_server: RedisServer, two_instances: tuple[list[Gunicorn], list[list[int]]],
        ) -> None:
    (east, west), (east_ports, west_ports) = two_instances
    redis_server.kill()
    east.wait_log("is down", timeout=TIMEOUT)
    text = f"during-{uuid.uuid4().hex[:8]}"
    r = _broadcast(east_ports[0], text)
    assert r.status_code == 503, r.text
    assert r.json()["delivered"] == "instance" and "bus bridge is down" in r.json()["error"]
    for port in east_ports:  # local delivery goes on
        wait_for(lambda port=port: text in _inbox(port), TIMEOUT, what=f"{text} on {port}")
    east.wait_log("reached this instance only", timeout=TIMEOUT)  # the worker was told too
    time.sleep(1.5)  # reconnect attempts fail meanwhile: still one line
    lost = r"gunicorn-ext: bus bridge to \S+ is down \(.*\); publications reach this instance"
    assert len(re.findall(lost, east.log_text())) == 1
    redis_server.start()
    for g in (east, west):
        g.wait_log("is back after", timeout=TIMEOUT)
    assert all(text not in _inbox(p) for p in west_ports)
    text = f"after-{uuid.uuid4().hex[:8]}"
    assert _broadcast(west_ports[1], text).status_code == 202
    for port in east_ports + west_ports:
        wait_for(lambda port=port: text in _inbox(port), TIMEOUT, what=f"{text} on {port}")
    for g in (east, west):
        assert len(re.findall(r"is back after", g.log_text())) == 1
        assert g.alive()
