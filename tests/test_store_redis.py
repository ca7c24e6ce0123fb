"""RedisStore: against fakeredis (fast) and a real redis-server (plus Sentinel and Cluster)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import redis.connection
from harness import RedisServer, find_binary, free_port, wait_for
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel, SentinelManagedSSLConnection
from store_contract import ALL_CHECKS

from gunicorn_ext.state.redis import RedisStore, redact_url
from gunicorn_ext.state.store import (
    LockTimeout,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
)

PASSWORD = "s3cr3t-pw"


@pytest.fixture(params=["fake", "real"])
def store(request: pytest.FixtureRequest) -> Iterator[RedisStore]:
    if request.param == "fake":
        s = RedisStore("redis://fake", client=fakeredis.FakeRedis())
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore(server.url)
    yield s
    s.close()


# -- basics (both) -------------------------------------------------------------------


def test_strings_and_ttl(store: RedisStore) -> None:
    assert store.get("a") is None
    store.set("a", b"1")
    assert store.get("a") == b"1"
    assert store.ttl("a") is None
    store.set("a", b"\x00\xff", ttl=5.5)
    assert store.get("a") == b"\x00\xff"
    left = store.ttl("a")
    assert left is not None and 5.0 < left <= 5.5
    store.set("a", b"x", ttl=0.001)  # 1 ms: rounded up, never "no TTL"
    time.sleep(0.02)
    assert store.get("a") is None
    store.set("b", b"y", ttl=0)  # already expired
    assert store.get("b") is None
    assert store.ttl("missing") is None


def test_incr_delete_expire(store: RedisStore) -> None:
    assert store.incr("n") == 1
    assert store.incr("n", 10) == 11
    assert store.incr("n", -12) == -1
    store.hset("h", {"f": b"v"})
    store.set("s", b"v")
    assert store.delete("n", "h", "s", "nope") == 3
    assert store.delete() == 0
    assert store.expire("nope", 10) is False
    store.set("s", b"v")
    assert store.expire("s", 0.05) is True
    time.sleep(0.1)
    assert store.get("s") is None


def test_hashes(store: RedisStore) -> None:
    assert store.hgetall("h") == {}
    store.hset("h", {"a": b"1", "é": b"\xff"})
    store.hset("h", {})
    assert store.hgetall("h") == {"a": b"1", "é": b"\xff"}
    store.hset("h", {"a": b"2"})
    assert store.hdel("h", "a", "zz") == 1
    assert store.hdel("h") == 0
    assert store.hgetall("h") == {"é": b"\xff"}
    assert store.ttl("h") is None
    assert store.expire("h", 30) is True
    left = store.ttl("h")
    assert left is not None and 29 < left <= 30
    store.hset("h", {"b": b"3"})  # HSET keeps the TTL (sliding expiry without rewrite)
    assert store.ttl("h") is not None
    assert store.delete("h") == 1
    assert store.hgetall("h") == {}


def test_batch_results(store: RedisStore) -> None:
    store.set("k", b"old")
    b = store.batch()
    out = (b.get("k").set("k", b"new", ttl=10).get("k").incr("c", 5).hset("h", {"x": b"1"})
           .hset("h", {}).hgetall("h").expire("h", 20).expire("missing", 1).hdel("h", "x")
           .delete("k", "c", "zz").delete().execute())
    assert out == [b"old", None, b"new", 5, None, None, {"x": b"1"}, True, False, 1, 2, 0]
    assert store.batch().execute() == []
    assert store.get("k") is None


def test_wrong_type_is_store_error(store: RedisStore) -> None:
    store.set("s", b"v")
    with pytest.raises(StoreError) as info:
        store.hgetall("s")
    assert not isinstance(info.value, StoreUnavailable)


def test_locks(store: RedisStore) -> None:
    token = store.acquire("job", timeout=5, blocking_timeout=0)
    assert token
    assert store.acquire("job", timeout=5, blocking_timeout=0) is None
    t0 = time.monotonic()
    assert store.acquire("job", timeout=5, blocking_timeout=0.2) is None
    assert 0.15 < time.monotonic() - t0 < 1.0
    assert store.release("job", "not-the-token") is False
    assert store.acquire("job", timeout=5, blocking_timeout=0) is None
    assert store.release("job", token) is True
    assert store.release("job", token) is False
    # lock keys do not collide with data keys
    store.set("job", b"data")
    with store.lock("job", timeout=5, blocking_timeout=0):
        assert store.get("job") == b"data"
        with pytest.raises(LockTimeout):
            with store.lock("job", timeout=5, blocking_timeout=0.05):
                pass
    assert store.acquire("job", timeout=5, blocking_timeout=0) is not None


def test_lock_expires(store: RedisStore) -> None:
    stale = store.acquire("exp", timeout=0.1, blocking_timeout=0)
    assert stale
    t0 = time.monotonic()
    fresh = store.acquire("exp", timeout=5, blocking_timeout=2)  # waits for the expiry
    assert fresh and fresh != stale
    assert time.monotonic() - t0 < 1.0
    assert store.release("exp", stale) is False  # the dead holder can't free the new one
    assert store.release("exp", fresh) is True


def test_lock_exclusion_threads(store: RedisStore) -> None:
    inside = 0
    peak = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, peak
        for _ in range(5):
            with store.lock("crit", timeout=5, blocking_timeout=10):
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.002)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 1


def test_ping_after_fork_close(store: RedisStore) -> None:
    store.ping()
    store.set("k", b"v")
    store.after_fork()
    assert store.get("k") == b"v"


# -- real server only ----------------------------------------------------------------


def _server_reads(client: redis.Redis) -> int:
    """Reads the server has processed (one per round trip of any client, this one's
    INFO included), from INFO stats: counted by Redis, whatever client sends."""
    return int(client.info("stats")["total_reads_processed"])


def test_batch_is_one_round_trip(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    observer = redis_server.client()
    store.batch().get("x").execute()  # connect first: the batches' connection
    store.ping()  # and one for plain commands
    before = _server_reads(observer)
    store.get("x")
    assert _server_reads(observer) - before - 1 == 1
    before = _server_reads(observer)
    out = store.batch().hgetall("s").hset("s", {"a": b"1"}).expire("s", 60).get("t").execute()
    assert out == [{}, None, True, None]
    assert _server_reads(observer) - before - 1 == 1
    # an error reply in the middle: every reply is still read, the error is raised,
    # and the connection (dropped, since replies were mixed) works again next time
    store.set("str", b"v")
    with pytest.raises(StoreError, match="WRONGTYPE"):
        store.batch().incr("n").hgetall("str").incr("n").execute()
    assert store.get("n") == b"2"
    assert store.batch().incr("n").execute() == [3]
    store.close()


def test_batch_reconnects_a_connection_the_server_closed(tmp_path: Path) -> None:
    # The server drops clients idle for 1 s (as after a restart, or behind a proxy): the
    # next batch finds its idle connection closed before sending, and reconnects.
    with RedisServer(tmp_path, extra_args=["--timeout", "1"]) as server:
        store = RedisStore(server.url)
        assert store.batch().set("k", b"v").get("k").execute() == [None, b"v"]
        idle = store._conns._idle[0].sock
        time.sleep(2.5)
        assert store.batch().get("k").incr("n").execute() == [b"v", 1]
        assert store._conns._idle[0].sock is not idle  # a new socket
        store.close()


def test_batch_connections_stay_within_the_pool(redis_server: RedisServer) -> None:
    # Batch connections come from the pool (which counts them) and at most half its
    # max_connections wait in the store: plain commands still get one.
    store = RedisStore(redis_server.url, max_connections=2)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def batches() -> None:
        try:
            barrier.wait(5)
            for _ in range(50):
                store.batch().incr("n").execute()
        except BaseException as exc:  # MaxConnectionsError when both are busy: fine
            errors.append(exc)

    threads = [threading.Thread(target=batches) for _ in range(2)]
    for t in threads:
        t.start()
    barrier.wait(5)
    for t in threads:
        t.join(10)
    assert len(store._conns._idle) <= 1
    assert store.get("n") is not None  # a plain command finds a connection
    assert store.batch().get("n").execute()[0] is not None
    store.close()


def test_batches_on_resp3(redis_server: RedisServer) -> None:
    # The batch reader parses RESP3 replies too (maps, booleans), shaped as on RESP2.
    store = RedisStore(redis_server.url, protocol=3)
    out = store.batch().hset("h", {"a": b"1"}).hgetall("h").expire("h", 10).incr("n").ttl("h").execute()
    assert out[:4] == [None, {"a": b"1"}, True, 1] and 0 < out[4] <= 10
    assert store.batch().hgetall("missing").execute() == [{}]
    store.close()


def test_fork_child_uses_own_connection(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    store.batch().set("b", b"parent").execute()  # the parent holds a batch connection
    batch_conn = store._conns._idle[0]
    store.set("k", b"parent")  # and a pooled one
    parent_conn = store.client.connection_pool._available_connections[0]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            # the batch connection is dropped by pid even without after_fork()
            if store.batch().get("b").execute() == [b"parent"] and store._conns._idle[0] is not batch_conn:
                store.after_fork()
                if store.get("k") == b"parent":
                    store.set("child", b"ok")
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("child") == b"ok"  # the parent's connections were left intact
    assert store.client.connection_pool._available_connections[0] is parent_conn
    assert store.batch().get("child").execute() == [b"ok"]
    assert store._conns._idle == [batch_conn]
    store.close()


def test_real_lua_release_used(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    token = store.acquire("l", timeout=5)
    assert token and store.release("l", token)
    assert store._lua_ok  # the compare-and-delete script ran on the real server
    store.close()


def test_outage_and_recovery(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory()
    # (the harness's readiness PING can't authenticate, so set the password afterwards)
    server.client().config_set("requirepass", PASSWORD)
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    store = RedisStore(url)
    store.set("k", b"v")
    assert store.get("k") == b"v"
    server.kill()

    ops: list[Callable[[], Any]] = [
        store.ping,
        lambda: store.get("k"),
        lambda: store.set("k", b"v", ttl=5),
        lambda: store.delete("k"),
        lambda: store.incr("n"),
        lambda: store.expire("k", 5),
        lambda: store.ttl("k"),
        lambda: store.hgetall("h"),
        lambda: store.hset("h", {"a": b"1"}),
        lambda: store.hdel("h", "a"),
        lambda: store.batch().get("k").hgetall("h").execute(),
        lambda: store.acquire("l", timeout=5, blocking_timeout=0),
        lambda: store.release("l", "tok"),
    ]
    for op in ops:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            op()
        assert time.monotonic() - t0 < 3.0
        message = str(info.value)
        assert PASSWORD not in message
        assert f"127.0.0.1:{server.port}" in message
        assert "***" in message

    server.start()
    server.client().config_set("requirepass", PASSWORD)
    store.ping()
    assert store.get("k") is None  # restarted empty: no persistence
    store.set("k", b"back")
    assert store.get("k") == b"back"
    assert store.batch().incr("n").hgetall("h").execute() == [1, {}]
    token = store.acquire("l", timeout=5, blocking_timeout=0)
    assert token and store.release("l", token)
    store.close()


def test_open_store_dispatch(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url)
    assert isinstance(store, RedisStore)
    store.set("a", b"1")
    assert store.get("a") == b"1"
    store.close()


def test_unix_socket(redis_server_factory: Callable[..., RedisServer], tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    redis_server_factory(extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"])
    store = RedisStore(f"unix://{sock}?db=2")
    store.set("a", b"1")
    assert store.get("a") == b"1"
    assert store.db == 2
    store.close()


# -- URL parsing (no connection) -----------------------------------------------------


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("redis://user@h:1/0") == "redis://user@h:1/0"
    assert (redact_url("redis+sentinel://:pw@a:1,b:2/mymaster")
            == "redis+sentinel://:***@a:1,b:2/mymaster")


def test_parse_plain_and_tls() -> None:
    s = RedisStore("redis://:pw@example.invalid:6380/3")
    assert s.kind == "redis" and s.hosts == [("example.invalid", 6380)] and s.db == 3
    kw = s.client.connection_pool.connection_kwargs
    assert kw["password"] == "pw" and kw["socket_timeout"] == 2.0
    assert kw["retry"].get_retries() == 0
    assert kw["decode_responses"] is False
    t = RedisStore("rediss://example.invalid:6380/0", socket_timeout=5)
    assert t.client.connection_pool.connection_class is redis.connection.SSLConnection
    assert t.client.connection_pool.connection_kwargs["socket_timeout"] == 5
    assert "pw" not in repr(s)


def test_parse_sentinel() -> None:
    s = RedisStore("redis+sentinel://:pw@s1.invalid:26379,s2.invalid:26380,s3.invalid/mymaster/4",
                   sentinel_password="spw")
    assert s.kind == "sentinel"
    assert isinstance(s._sentinel, Sentinel)
    assert isinstance(s.client, redis.Redis)
    assert s.service_name == "mymaster" and s.db == 4
    assert s.hosts == [("s1.invalid", 26379), ("s2.invalid", 26380), ("s3.invalid", 26379)]
    sentinel_hosts = [(c.connection_pool.connection_kwargs["host"],
                       c.connection_pool.connection_kwargs["port"]) for c in s._sentinel.sentinels]
    assert sentinel_hosts == s.hosts
    assert s._sentinel.sentinels[0].connection_pool.connection_kwargs["password"] == "spw"
    pool = s.client.connection_pool
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 4 and pool.connection_kwargs["password"] == "pw"
    tls = RedisStore("rediss+sentinel://h.invalid:26379/svc")
    assert tls.client.connection_pool.connection_class is SentinelManagedSSLConnection
    with pytest.raises(ValueError):
        RedisStore("redis+sentinel://h.invalid:26379")


def test_parse_cluster_lazy() -> None:
    s = RedisStore("rediss+cluster://:pw@c1.invalid:7000,c2.invalid:7001,[::1]:7002")
    assert s.kind == "cluster"
    assert s.hosts == [("c1.invalid", 7000), ("c2.invalid", 7001), ("::1", 7002)]
    assert s._client is None  # nothing connected yet


def test_unreachable_urls_fast() -> None:
    port = free_port()
    for url in (f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
                f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/mymaster",
                f"redis+cluster://:{PASSWORD}@127.0.0.1:{port}"):
        s = RedisStore(url)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            s.get("k")
        assert time.monotonic() - t0 < 3.0
        assert PASSWORD not in str(info.value) and "***" in str(info.value)


# -- the shared store contract, on a real and a fake Redis ---------------------------


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("flavour", ["real", "fake"])
def test_store_contract(check: Callable[[Store], None], flavour: str,
                        request: pytest.FixtureRequest) -> None:
    if flavour == "real":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore(server.url)
    else:
        store = RedisStore("redis://fake", client=fakeredis.FakeRedis())
    try:
        check(store)
    finally:
        store.close()


# -- Sentinel and Cluster, for real --------------------------------------------------


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait(timeout=5)


def _answers(port: int) -> bool:
    try:
        with contextlib.closing(redis.Redis(port=port, socket_timeout=0.5)) as c:
            return bool(c.ping())
    except redis.RedisError:
        return False


def test_sentinel_live(redis_server_factory: Callable[..., RedisServer], tmp_path: Path) -> None:
    binary = find_binary("redis-server")
    assert binary is not None
    master = redis_server_factory()
    master.client().config_set("requirepass", PASSWORD)
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        f"sentinel auth-pass mymaster {PASSWORD}\n"
        "sentinel down-after-milliseconds mymaster 5000\n")
    with _process([binary, str(conf), "--sentinel"], tmp_path / "sentinel.log") as proc:
        try:
            wait_for(lambda: proc.poll() is None and _answers(port), 10, what="sentinel")
        except Exception:
            pytest.fail(f"redis-server --sentinel did not answer:\n"
                        f"{(tmp_path / 'sentinel.log').read_text()[-500:]}", pytrace=False)
        store = RedisStore(f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/mymaster/1")
        store.set("k", b"v", ttl=30)
        assert store.get("k") == b"v"
        assert master.client(password=PASSWORD, db=1).get("k") == b"v"
        assert store.batch().incr("n").hset("h", {"a": b"1"}).hgetall("h").execute() == [
            1, None, {"a": b"1"}]
        token = store.acquire("l", timeout=5)
        assert token and store.release("l", token)
        store.after_fork()
        assert store.get("k") == b"v"
        master.kill()
        with pytest.raises(StoreUnavailable) as info:
            store.get("k")
        assert PASSWORD not in str(info.value)
        master.start()
        master.client().config_set("requirepass", PASSWORD)
        wait_for(lambda: _ok(lambda: store.set("k", b"again")), 10, what="sentinel recovery")
        assert store.get("k") == b"again"
        store.close()


def _ok(fn: Callable[[], Any]) -> bool:
    try:
        fn()
        return True
    except StoreUnavailable:
        return False


def test_cluster_live(redis_server_factory: Callable[..., RedisServer]) -> None:
    cli = find_binary("redis-cli")
    if cli is None:
        pytest.skip("redis-cli not installed: can't create a local cluster")
    # an explicit bus port (Redis >= 7): the default port+10000 fails above 55535
    nodes = [redis_server_factory(extra_args=["--cluster-enabled", "yes",
                                              "--cluster-port", str(free_port()),
                                              "--cluster-node-timeout", "5000"])
             for _ in range(3)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    result = subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas", "0",
                             "--cluster-yes"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "ERR unknown command" in result.stdout + result.stderr:
        pytest.skip(f"redis-cli --cluster unsupported: {result.stdout[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr

    def cluster_ok() -> bool:
        for n in nodes:
            info = n.client(decode_responses=True).cluster("info")
            if info.get("cluster_state") != "ok":
                return False
        return True

    wait_for(cluster_ok, 20, what="cluster_state:ok")
    store = RedisStore("redis+cluster://" + ",".join(addrs))
    keys = [f"key-{i}" for i in range(20)]  # spread over the three masters
    for i, key in enumerate(keys):
        store.set(key, str(i).encode(), ttl=60)
    assert isinstance(store.client, RedisCluster)
    assert [store.get(k) for k in keys] == [str(i).encode() for i in range(20)]
    assert store.delete(*keys) == 20  # split across slots by redis-py
    session = "session:{abc}"
    out = (store.batch().hset(session, {"a": b"1", "b": b"2"}).expire(session, 30)
           .hgetall(session).hdel(session, "a").execute())
    assert out == [None, True, {"a": b"1", "b": b"2"}, 1]
    assert store.batch().delete("x1", "x2", session).execute() == [1]  # per-key DELs
    assert store.incr("counter", 3) == 3
    token = store.acquire("job", timeout=5)
    assert token and store.acquire("job", timeout=5, blocking_timeout=0) is None
    assert store.release("job", "wrong") is False and store.release("job", token) is True
    store.after_fork()
    assert store.incr("counter") == 4
    store.close()
