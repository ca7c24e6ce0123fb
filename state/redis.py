"""Redis backend of the store interface, on redis-py's own clients.

URL forms:

* ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), ``unix:///path?db=0``:
  :meth:`redis.Redis.from_url` (query options such as ``?ssl_cert_reqs=none`` work as there);
* ``redis+sentinel://[[user]:password@]host1:port1,host2:port2/service_name[/db]``
  (``rediss+sentinel`` for TLS): ``Sentinel([...]).master_for(service_name, db=db)``.
  The password is the master's; pass ``sentinel_password=`` (or ``sentinel_kwargs=``)
  if the sentinels themselves need one;
* ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+cluster``):
  :class:`redis.cluster.RedisCluster` with those startup nodes, created on first use
  (it connects when created).

Defaults: 2 s socket and connect timeouts, a health check of idle connections after
30 s, RESP2, and no automatic retries, so an outage shows in milliseconds (as
:class:`~gunicorn_ext.state.store.StoreUnavailable`) rather than after redis-py's retry loop. Keyword
options override them and are passed to the client.

Every redis-py error is mapped: unreachable/timeouts/loading/failover errors to
:class:`StoreUnavailable` (naming the URL without its password), anything else (e.g.
WRONGTYPE) to :class:`StoreError`.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from gunicorn_ext.extras import missing_extra

try:
    import redis
    import redis.exceptions as rexc
    from redis._parsers import BaseParser
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:
    raise missing_extra(exc, "redis", __name__) from exc

from .store import Batch, Store, StoreError, StoreUnavailable

try:
    import hiredis  # redis[hiredis], a dependency: the fast reply parser

    _hiredis_ok = True
except ImportError:  # pragma: no cover - redis-py's own reads then
    _hiredis_ok = False

_parse_error = BaseParser.parse_error

__all__ = ["RedisStore", "redact_url"]

DEFAULT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 30,
    # RESP2 (redis-py 8 defaults to RESP3): no out-of-band pushes can come between a
    # batch's replies, so batches read their replies themselves (see _Connections).
    # protocol=3 works too, through redis-py's own reads.
    "protocol": 2,
}

# Errors meaning "the backend can't be reached right now" (ConnectionError covers
# BusyLoadingError, AuthenticationError, MasterNotFoundError, MaxConnectionsError).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterDownError,  # includes MasterDownError
    rexc.TryAgainError,
    rexc.ReadOnlyError,  # a replica that used to be the master, mid-failover
    rexc.SlotNotCoveredError,
    OSError,
)

_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


def _ms(ttl: float) -> int:
    """Seconds (float) to whole milliseconds, at least 1 ms for any positive TTL."""
    return max(1, math.ceil(ttl * 1000)) if ttl > 0 else 0


def _hosts(netloc_hosts: str, default_port: int) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for item in netloc_hosts.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
        elif ":" in item:
            host, _, port_s = item.rpartition(":")
            port = int(port_s)
        else:
            host, port = item, default_port
        out.append((host, port))
    if not out:
        raise ValueError("no host in the store URL")
    return out


def _decode_hash(raw: Any) -> dict[str, bytes]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in (raw or {}).items()}


def _ttl_result(ms: Any) -> float | None:
    ms = int(ms)
    return None if ms < 0 else ms / 1000.0


def _none(_: Any) -> None:
    return None


class RedisStore(Store):
    """A :class:`~gunicorn_ext.state.store.Store` on Redis (plain, TLS, unix socket, Sentinel, Cluster).

    ``client=`` uses a ready redis-py compatible client instead (e.g. fakeredis); it
    must be created with ``decode_responses=False``.
    ``lock_prefix`` (default ``"lock:"``) namespaces lock keys away from data keys.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", client: Any = None,
                 lock_prefix: str = "lock:", **options: Any) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.lock_prefix = lock_prefix
        self._password: str | None = None
        self._sentinel: Any = None
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._factory: Callable[[], Any] | None = None
        self._release_script: Any = None
        self._lua_ok = True
        self._conns = _Connections()
        self.hosts: list[tuple[str, int]] = []
        self.service_name: str | None = None
        self.db = 0

        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        self.kind = {"redis+sentinel": "sentinel", "rediss+sentinel": "sentinel",
                     "redis+cluster": "cluster", "rediss+cluster": "cluster"}.get(scheme, "redis")
        if client is not None:
            self._client = client
            self.kind = "cluster" if _is_cluster(client) else "redis"
            return

        opts = dict(DEFAULT_OPTIONS)
        opts["retry"] = Retry(NoBackoff(), 0)
        opts.update(options)
        opts["decode_responses"] = False
        userinfo, _, hostpart = parts.netloc.rpartition("@")
        username = unquote(userinfo.split(":", 1)[0]) if userinfo else ""
        password = unquote(userinfo.split(":", 1)[1]) if ":" in userinfo else None
        self._password = password or None
        tls = scheme.startswith("rediss")
        query = dict(parse_qsl(parts.query))

        if self.kind == "redis":
            if scheme not in ("redis", "rediss", "unix"):
                raise ValueError(f"not a redis URL: {self.safe_url}")
            self._client = redis.Redis.from_url(url, **opts)
            kw = self._client.connection_pool.connection_kwargs
            self.db = int(kw.get("db") or 0)
            if "host" in kw:
                self.hosts = [(kw["host"], int(kw.get("port", 6379)))]
            return

        if username:
            opts.setdefault("username", username)
        if password:
            opts.setdefault("password", password)
        if tls:
            opts.setdefault("ssl", True)

        if self.kind == "sentinel":
            from redis.sentinel import Sentinel

            self.hosts = _hosts(hostpart, 26379)
            path = [p for p in parts.path.split("/") if p]
            if not path:
                raise ValueError(
                    f"sentinel URL needs a service name: {self.safe_url} "
                    "(redis+sentinel://host:26379,host:26379/mymaster[/db])")
            self.service_name = unquote(path[0])
            self.db = int(path[1]) if len(path) > 1 else int(query.get("db", 0))
            sentinel_kwargs = dict(opts.pop("sentinel_kwargs", None) or {})
            sentinel_password = opts.pop("sentinel_password", None)
            for key in ("socket_timeout", "socket_connect_timeout", "retry", "ssl"):
                if key in opts:
                    sentinel_kwargs.setdefault(key, opts[key])
            if sentinel_password:
                sentinel_kwargs.setdefault("password", sentinel_password)
            opts.pop("db", None)
            self._sentinel = Sentinel(self.hosts, sentinel_kwargs=sentinel_kwargs, **opts)
            self._client = self._sentinel.master_for(self.service_name, db=self.db)
            return

        # cluster: RedisCluster connects when created, so create it on first use.
        from redis.cluster import ClusterNode, RedisCluster

        self.hosts = _hosts(hostpart, 6379)
        nodes = [ClusterNode(h, p) for h, p in self.hosts]
        opts.pop("db", None)

        def make_cluster() -> Any:
            return RedisCluster(startup_nodes=nodes, **opts)

        self._factory = make_cluster

    # -- plumbing -------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The redis-py client (for a cluster URL, created, i.e. connected, on first use)."""
        if self._client is None:
            with self._client_lock, self._errors():
                if self._client is None:
                    assert self._factory is not None
                    self._client = self._factory()
        return self._client

    def _message(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        if self._password:
            text = text.replace(self._password, "***")
        if len(text) > 300:  # MasterNotFoundError lists every sentinel client's repr
            text = text[:297] + "..."
        return f"redis store {self.safe_url} unavailable ({text})"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(self._message(exc)) from exc
        except rexc.RedisClusterException as exc:
            if "cannot be connected" in str(exc) or "reachable" in str(exc):
                raise StoreUnavailable(self._message(exc)) from exc
            raise StoreError(f"redis store {self.safe_url}: {exc}") from exc
        except rexc.RedisError as exc:
            text = str(exc).replace(self._password, "***") if self._password else str(exc)
            raise StoreError(f"redis store {self.safe_url}: {type(exc).__name__}: {text}") from exc

    # -- strings --------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        with self._errors():
            value: bytes | None = self.client.get(key)
            return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        with self._errors():
            if ttl is None:
                self.client.set(key, value)
            elif ttl <= 0:
                self.client.delete(key)  # already expired
            else:
                self.client.set(key, value, px=_ms(ttl))

    def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        with self._errors():
            return int(self.client.delete(*keys))

    def incr(self, key: str, amount: int = 1) -> int:
        with self._errors():
            return int(self.client.incrby(key, amount))

    def expire(self, key: str, ttl: float) -> bool:
        with self._errors():
            return bool(self.client.pexpire(key, _ms(ttl)))

    def ttl(self, key: str) -> float | None:
        with self._errors():
            return _ttl_result(self.client.pttl(key))

    # -- hashes ---------------------------------------------------------------------

    def hgetall(self, key: str) -> dict[str, bytes]:
        with self._errors():
            return _decode_hash(self.client.hgetall(key))

    def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        if not mapping:
            return
        with self._errors():
            self.client.hset(key, mapping=mapping)

    def hdel(self, key: str, *fields: str) -> int:
        if not fields:
            return 0
        with self._errors():
            return int(self.client.hdel(key, *fields))

    # -- batch ----------------------------------------------------------------------

    def batch(self) -> RedisBatch:
        return RedisBatch(self)

    # -- locks ----------------------------------------------------------------------

    def acquire(self, name: str, timeout: float, blocking_timeout: float | None = None) -> str | None:
        key = self.lock_prefix + name
        token = secrets.token_hex(16)
        ms = _ms(timeout) or 1
        deadline = None if blocking_timeout is None else time.monotonic() + max(0.0, blocking_timeout)
        delay = 0.005
        while True:
            with self._errors():
                if self.client.set(key, token, nx=True, px=ms):
                    return token
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            sleep = delay if deadline is None else min(delay, deadline - now)
            time.sleep(max(0.0, sleep))
            delay = min(delay * 2, 0.05)

    def release(self, name: str, token: str) -> bool:
        key = self.lock_prefix + name
        with self._errors():
            if self._lua_ok:
                if self._release_script is None:
                    self._release_script = self.client.register_script(_RELEASE_LUA)
                try:
                    return bool(self._release_script(keys=[key], args=[token]))
                except rexc.ResponseError as exc:
                    # fakeredis without the lupa extra has no Lua
                    if "unknown command" not in str(exc).lower():
                        raise
                    self._lua_ok = False
            return self._release_watch(key, token)

    def _release_watch(self, key: str, token: str) -> bool:
        want = token.encode()
        while True:
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    if pipe.get(key) != want:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.delete(key)
                    pipe.execute()
                    return True
                except rexc.WatchError:
                    continue

    # -- lifecycle ------------------------------------------------------------------

    def ping(self) -> None:
        with self._errors():
            self.client.ping()

    def after_fork(self) -> None:
        """Forget inherited connections without touching their sockets (the parent owns them)."""
        self._client_lock = threading.Lock()  # another thread may have held it at fork
        self._conns.forget()
        pools = []
        if self._client is not None:
            if _is_cluster(self._client):
                for node in list(self._client.get_nodes()):
                    if node.redis_connection is not None:
                        pools.append(node.redis_connection.connection_pool)
            elif getattr(self._client, "connection_pool", None) is not None:
                pools.append(self._client.connection_pool)
        if self._sentinel is not None:
            pools.extend(s.connection_pool for s in self._sentinel.sentinels)
        for pool in pools:
            with contextlib.suppress(Exception):
                pool.reset()

    def close(self) -> None:
        self._conns.close()
        clients = [self._client] if self._client is not None else []
        if self._sentinel is not None:
            clients.extend(self._sentinel.sentinels)
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
        if self._factory is not None:
            self._client = None

    def __repr__(self) -> str:
        return f"<RedisStore {self.kind} {self.safe_url}>"


def _is_cluster(client: Any) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


class RedisBatch(Batch):
    """A non-transactional pipeline: one round trip; results converted like the plain methods.

    In cluster mode every command is per key, so a batch touching one session key
    stays in one slot; multi-key ``delete`` is queued as one DEL per key.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._ops: list[tuple[list[tuple[Any, ...]], Callable[[list[Any]], Any]]] = []

    def _add(self, cmds: list[tuple[Any, ...]], convert: Callable[[list[Any]], Any]) -> RedisBatch:
        self._ops.append((cmds, convert))
        return self

    def get(self, key: str) -> RedisBatch:
        return self._add([("GET", key)], lambda r: r[0])

    def set(self, key: str, value: bytes, ttl: float | None = None) -> RedisBatch:
        if ttl is None:
            return self._add([("SET", key, value)], _none)
        if ttl <= 0:
            return self._add([("DEL", key)], _none)
        return self._add([("SET", key, value, "PX", _ms(ttl))], _none)

    def delete(self, *keys: str) -> RedisBatch:
        if not keys:
            return self._add([], lambda r: 0)
        if self._store.kind == "cluster":
            return self._add([("DEL", k) for k in keys], lambda r: sum(int(x) for x in r))
        return self._add([("DEL", *keys)], lambda r: int(r[0]))

    def incr(self, key: str, amount: int = 1) -> RedisBatch:
        return self._add([("INCRBY", key, amount)], lambda r: int(r[0]))

    def expire(self, key: str, ttl: float) -> RedisBatch:
        return self._add([("PEXPIRE", key, _ms(ttl))], lambda r: bool(r[0]))

    def ttl(self, key: str) -> RedisBatch:
        """Not in the :class:`Batch` interface, but handy: PTTL as seconds or None."""
        return self._add([("PTTL", key)], lambda r: _ttl_result(r[0]))

    def hgetall(self, key: str) -> RedisBatch:
        return self._add([("HGETALL", key)], lambda r: _decode_hash(r[0]))

    def hset(self, key: str, mapping: dict[str, bytes]) -> RedisBatch:
        if not mapping:
            return self._add([], _none)
        args: list[Any] = ["HSET", key]
        for field, value in mapping.items():
            args += (field, value)
        return self._add([tuple(args)], _none)

    def hdel(self, key: str, *fields: str) -> RedisBatch:
        if not fields:
            return self._add([], lambda r: 0)
        return self._add([("HDEL", key, *fields)], lambda r: int(r[0]))

    def execute(self) -> list[Any]:
        ops, self._ops = self._ops, []
        if not ops:
            return []
        store = self._store
        cmds = [cmd for op_cmds, _ in ops for cmd in op_cmds]
        with store._errors():
            if not cmds:
                raw: list[Any] = []
            elif store.kind == "cluster":
                pipe = store.client.pipeline(transaction=False)
                for cmd in cmds:
                    pipe.execute_command(*cmd)
                raw = pipe.execute()
                pipe.reset()
            else:
                raw = _send_all(store.client.connection_pool, store._conns, cmds)
        results: list[Any] = []
        pos = 0
        for op_cmds, convert in ops:
            count = len(op_cmds)
            results.append(convert(raw[pos:pos + count]))
            pos += count
        return results


def _pack(cmds: list[tuple[Any, ...]]) -> bytes:
    """RESP-encode ``cmds`` (arguments are str, bytes or int: all a batch queues).

    A few microseconds where redis-py's general ``pack_commands`` takes tens.
    """
    out: list[bytes] = []
    for cmd in cmds:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            if type(arg) is str:
                arg = arg.encode()
            elif type(arg) is int:
                arg = b"%d" % arg
            elif not isinstance(arg, bytes):
                raise TypeError(f"cannot send {type(arg).__name__} to redis")
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class _Connections:
    """Idle connections of the batches, taken from a redis-py pool and held by the store.

    redis-py 8 spends more on each pool checkout (locks, a readiness poll, metrics
    bookkeeping) and on each reply than a loopback round trip costs, and a session
    request makes two batches. So a batch takes a connection from this LIFO (from the
    pool, which counts it, only when the LIFO is empty), writes its commands on the
    connection's socket at once and parses the replies with a hiredis reader of its
    own, then puts the connection back once every reply is read: it is always clean.
    redis-py still does everything else: connecting, AUTH, SELECT, TLS, finding the
    master through Sentinel, the idle health check. Before each use a zero-timeout
    poll finds a connection the server closed while it sat here (a restart, the
    server's ``timeout``), which is reconnected before anything is sent. Any error
    disconnects the connection (it reconnects on next use). At most half the pool's
    ``max_connections`` wait here; more go back to the pool.

    The LIFO belongs to one process: after a fork it starts empty, and the inherited
    connections are dropped without touching their sockets.
    """

    def __init__(self) -> None:
        self._idle: list[_Wire] = []
        self._pid = os.getpid()

    def take(self, pool: Any) -> _Wire:
        if self._pid != os.getpid():
            self.forget()
        try:
            return self._idle.pop()
        except IndexError:
            return _Wire(pool.get_connection())

    def give(self, wire: _Wire, pool: Any) -> None:
        conn = wire.conn
        if getattr(conn, "pid", None) not in (None, os.getpid()):
            return
        if len(self._idle) < max(1, int(getattr(pool, "max_connections", 100)) // 2):
            self._idle.append(wire)
        else:
            with contextlib.suppress(Exception):
                pool.release(conn)

    def forget(self) -> None:
        self._idle = []
        self._pid = os.getpid()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for wire in idle:
            with contextlib.suppress(Exception):
                wire.conn.disconnect()


_POLL_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(
    select, "POLLRDHUP", 0)


class _Wire:
    """One batch connection, and how a batch drives its current socket.

    Whether the socket can be driven directly (a plain socket speaking RESP2, with
    hiredis at hand) is decided once per socket, when it is new; then it gets its
    own reader and a poller for the staleness check.
    """

    __slots__ = ("conn", "sock", "reader", "poller")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sock: Any = None
        self.reader: Any = None   # a hiredis.Reader when the socket is driven directly
        self.poller: Any = None

    def ready(self) -> bool:
        """Connect if needed, clean; True when the batch may drive the socket itself."""
        conn = self.conn
        sock = getattr(conn, "_sock", None)
        if sock is not None and sock is self.sock and self.poller is not None and (
                self.poller.poll(0) or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)):
            conn.disconnect()  # closed by the server (or bytes nobody asked for): afresh
            sock = None
        if sock is None:
            conn.connect()  # the class's own connect (Sentinel: find the master first)
        conn.check_health()  # a PING if the connection sat idle past the interval
        sock = getattr(conn, "_sock", None)
        if sock is not self.sock:
            self.sock = sock
            self.reader = self.poller = None
            if (_hiredis_ok and isinstance(sock, socket.socket)
                    and str(getattr(conn, "protocol", 2) or 2) == "2"):
                self.reader = hiredis.Reader()
                self.poller = select.poll()
                self.poller.register(sock, _POLL_EVENTS)
        return self.reader is not None

    def read_replies(self, count: int) -> list[Any]:
        """``count`` replies from the socket, error replies as redis-py exceptions."""
        conn, sock, reader = self.conn, self.sock, self.reader
        out: list[Any] = []
        while len(out) < count:
            reply = reader.gets()
            if reply is False:
                data = sock.recv(65536)
                if not data:
                    raise rexc.ConnectionError("redis closed the connection")
                reader.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                reply = _parse_error(str(reply))
            out.append(reply)
        if reader.has_data():  # more than was asked for: never reuse this connection
            conn.disconnect()
        if conn.health_check_interval:  # as redis-py does after each reply it reads
            conn.next_health_check = time.monotonic() + conn.health_check_interval
        return out


def _send_all(pool: Any, conns: _Connections, cmds: list[tuple[Any, ...]]) -> list[Any]:
    """Write every command at once on one connection and read the replies.

    The round trip of a pipeline without redis-py's Pipeline object, which
    costs more than the round trip itself on loopback. Replies are shaped as
    the pipeline's callbacks would shape them, so the converters are shared.
    """
    wire = conns.take(pool)
    conn = wire.conn
    try:
        if wire.ready():
            wire.sock.sendall(_pack(cmds))
            raw = wire.read_replies(len(cmds))
        else:  # not a plain RESP2 socket (fakeredis, RESP3, client-side caching): redis-py
            conn.send_packed_command([_pack(cmds)])
            raw = []
            for _ in cmds:
                try:
                    raw.append(conn.read_response())
                except rexc.ResponseError as exc:  # keep reading: stay in sync
                    raw.append(exc)
        error = next((r for r in raw if isinstance(r, Exception)), None)
        if error is not None:  # e.g. READONLY from a demoted master: reconnect next time
            conn.disconnect()
    except BaseException:
        conn.disconnect()  # replies may be left unread: never reuse this connection
        raise
    finally:
        conns.give(wire, pool)
    if error is not None:
        raise error
    out: list[Any] = []
    for cmd, reply in zip(cmds, raw, strict=True):
        name = cmd[0]
        if name == "HGETALL" and isinstance(reply, list):
            it = iter(reply)
            reply = dict(zip(it, it, strict=True))
        elif name == "PEXPIRE":
            reply = bool(reply)
        elif name == "SET":
            reply = reply in (b"OK", "OK", True)
        out.append(reply)
    return out
