"""Redis backend of the store interface, on redis-py's own clients and public API only.

URL forms:

* ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), ``unix:///path?db=0``:
  :meth:`redis.Redis.from_url` (query options such as ``?ssl_ca_certs=/path/ca.pem`` or
  ``?ssl_cert_reqs=none`` work as there);
* ``redis+sentinel://[[user]:password@]host1:port1,host2:port2/service_name[/db]``
  (``rediss+sentinel`` for TLS): ``Sentinel([...]).master_for(service_name, db=db)``.
  The password is the master's; pass ``sentinel_password=`` (or ``sentinel_kwargs=``)
  if the sentinels themselves need one. Query options are read as ``from_url`` reads
  them (``?ssl_ca_certs=/path/ca.pem``) and apply to the sentinels too (timeouts, TLS);
* ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+cluster``):
  :class:`redis.cluster.RedisCluster` with those startup nodes, created on first use
  (it connects when created).

Every command goes through redis-py: plain commands through the client, batches
through a non-transactional :meth:`~redis.Redis.pipeline` (one round trip), locks
through :class:`redis.lock.Lock`. So everything redis-py does for a connection holds:
the pool, TLS, AUTH with a ``credential_provider=``, RESP3 (``protocol=3``),
re-finding the master through Sentinel, its ``retry=`` policy.

For a ``redis://``, ``rediss://`` or ``unix://`` URL, each OS thread sends its plain
commands on a connection of the pool it holds (:meth:`redis.Redis.client`), up to half
the pool's ``max_connections`` (100 by default; batches still check one out): checking a
connection out of the pool and back in for every command costs about a quarter of a
loopback round trip's CPU. A held connection is checked for an unread reply before each
command, as the pool checks one it hands out. A holding thread's batch takes one more,
so a process with more than 50 threads sending to Redis at the same moment can reach the
pool's limit (redis-py's MaxConnectionsError, a
:class:`~gunicorn_ext.state.store.StoreUnavailable`); give ``max_connections=`` to size
the pool yourself. With ``max_connections=`` given, under gevent's monkey patching, and
for Sentinel and Cluster URLs, nothing is held: every command checks a connection out of
the pool.

Defaults: 2 s socket and connect timeouts, a health check of idle connections after
30 s, RESP2, and no automatic retries, so an outage shows in milliseconds (as
:class:`~gunicorn_ext.state.store.StoreUnavailable`, which the Flask session turns into
a 503) rather than after a retry loop, and a batch holding an ``INCR`` is never sent
twice. Keyword options override them and are passed to the client, e.g.
``retry=Retry(ExponentialBackoff(cap=0.5), 2)`` to ride out a failover in-process.

Every redis-py error is mapped: unreachable/timeouts/loading/failover errors to
:class:`StoreUnavailable` (naming the URL without its password), WRONGTYPE to
:class:`~gunicorn_ext.state.store.WrongType`, a non-integer counter to
:class:`~gunicorn_ext.state.store.NotAnInteger`, anything else to
:class:`~gunicorn_ext.state.store.StoreError`.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from gunicorn_ext.extras import missing_extra

try:
    import redis
    import redis.exceptions as rexc
    from redis.backoff import NoBackoff
    from redis.connection import parse_url
    from redis.lock import Lock
    from redis.retry import Retry
except ImportError as exc:
    raise missing_extra(exc, "redis", __name__) from exc

from .store import (
    Batch,
    NotAnInteger,
    Store,
    StoreError,
    StoreUnavailable,
    WrongType,
    check_amount,
    check_lock_timeout,
    check_ttl,
    check_value,
)

__all__ = ["RedisStore", "redact_url"]

DEFAULT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 30,
    # RESP2: redis-py 8 defaults to RESP3, which also turns on maintenance-notification
    # handling per connection. ``protocol=3`` works the same (tests/test_store_redis.py).
    "protocol": 2,
}

# How often a blocked lock taker tries again (redis-py's Lock polls; 0.1 s by default).
LOCK_POLL = 0.01

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
# What redis-py raises (RedisClusterException is not a RedisError), mapped by RedisStore._mapped.
_REDIS_ERRORS = (rexc.RedisError, rexc.RedisClusterException, OSError)


def _bound_unacked_writes(opts: dict[str, Any]) -> None:
    """Make a command that timed out unable to reach Redis later (TCP connections only).

    When the link to Redis is cut, a write already handed to the kernel stays in its send
    queue after redis-py times out and closes the connection; the kernel retransmits it
    for minutes, and when the link comes back it lands, after the client was told 503
    and went on elsewhere: a session set back to an older value. ``TCP_USER_TIMEOUT`` (a
    TCP option redis-py's ``socket_keepalive_options`` applies) makes the kernel drop
    unacknowledged data and the connection once 90% of ``socket_timeout`` has passed, so
    a write either lands before its command times out or never. Redis acknowledges at the
    TCP level at once, however slow the command, so only a dead link trips it. Explicit
    ``socket_keepalive_options`` win; no effect without a ``socket_timeout``.
    """
    timeout = opts.get("socket_timeout")
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if not timeout or option is None:
        return
    keepalive = dict(opts.get("socket_keepalive_options") or {})
    keepalive.setdefault(option, max(1, int(float(timeout) * 900)))
    opts["socket_keepalive_options"] = keepalive
    opts.setdefault("socket_keepalive", True)


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


# Bumped in every forked child, so a thread's held client from before a fork (its
# connection the parent's) is never used after it.
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


def _green_threads() -> bool:
    """Whether gevent has patched ``threading`` (requests are greenlets, not threads)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


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


def _is_cluster(client: Any) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


class RedisStore(Store):
    """A :class:`~gunicorn_ext.state.store.Store` on Redis (plain, TLS, unix socket,
    Sentinel, Cluster).

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
        # How many threads may hold a connection each (see the module docstring), how
        # many more may in this process, and this thread's (fork count, client, held
        # connection or None).
        self._hold_limit = 0
        self._holds_left = 0
        self._holds_forks = _forks
        self._held = threading.local()
        self.hosts: list[tuple[str, int]] = []
        self.service_name: str | None = None
        self.db = 0

        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        self.kind = {"redis+sentinel": "sentinel", "rediss+sentinel": "sentinel",
                     "redis+cluster": "cluster", "rediss+cluster": "cluster"}.get(scheme, "redis")
        if client is not None:
            kwargs = getattr(client, "get_connection_kwargs", None)
            if kwargs is not None and kwargs().get("decode_responses"):
                raise ValueError(
                    "the store's redis client must be created with decode_responses=False "
                    "(stored values are bytes; a decoding client would turn them into text "
                    "and lose what isn't)")
            self._client = client
            self.kind = "cluster" if _is_cluster(client) else "redis"
            return

        opts = dict(DEFAULT_OPTIONS)
        opts["retry"] = Retry(NoBackoff(), 0)
        if self.kind != "redis" and parts.query:
            # Query options (``?ssl_ca_certs=...&protocol=3``) read as from_url reads them.
            for name, value in parse_url(f"redis://localhost/?{parts.query}").items():
                if name not in ("host", "port", "db"):
                    opts[name] = value
        opts.update(options)
        opts["decode_responses"] = False
        if scheme != "unix":
            _bound_unacked_writes(opts)
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
            if "max_connections" not in opts and "max_connections" not in query:
                self._hold_limit = self._client.connection_pool.max_connections // 2
                self._holds_left = self._hold_limit
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
            for key in ("socket_timeout", "socket_connect_timeout", "retry", "ssl", "ssl_ca_certs",
                        "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"):
                if key in opts:
                    sentinel_kwargs.setdefault(key, opts[key])
            if sentinel_password:
                sentinel_kwargs.setdefault("password", sentinel_password)
            # the connections to the sentinels too, from their own socket_timeout
            _bound_unacked_writes(sentinel_kwargs)
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
            with self._client_lock:
                if self._client is None:
                    assert self._factory is not None
                    try:
                        self._client = self._factory()
                    except _REDIS_ERRORS as exc:
                        raise self._mapped(exc) from exc
        return self._client

    @property
    def _own(self) -> Any:
        """The client for one plain command: this thread's, holding a connection of the
        pool, where the store holds them (see the module docstring); else the shared one."""
        held = getattr(self._held, "client", None)
        if held is None or held[0] != _forks:
            return self._hold()
        conn = held[2]
        if conn is not None and conn.is_connected:
            try:
                stale = conn.can_read()  # a reply left unread by an interrupted command
            except _REDIS_ERRORS:  # closed by the server (a restart, an idle timeout)
                stale = True
            if stale:
                conn.disconnect()  # the command connects again
        return held[1]

    def _hold(self) -> Any:
        client = self.client
        conn = None
        if self._holds_forks != _forks:  # a forked child: no thread holds one yet
            self._holds_forks, self._holds_left = _forks, self._hold_limit
        if self._holds_left > 0 and not _green_threads():
            client = client.client()  # connects (redis-py's errors, mapped by the caller)
            conn = client.connection
            self._holds_left -= 1
        self._held.client = (_forks, client, conn)
        return client

    def _redact(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _message(self, exc: BaseException) -> str:
        text = self._redact(f"{type(exc).__name__}: {exc}")
        if len(text) > 300:  # MasterNotFoundError lists every sentinel client's repr
            text = text[:297] + "..."
        return f"redis store {self.safe_url} unavailable ({text})"

    def _mapped(self, exc: BaseException) -> BaseException:
        """The store error to raise for redis-py's ``exc`` (a plain try/except at each
        call site: a context manager would cost more than a loopback round trip's CPU)."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, _UNAVAILABLE):
            return StoreUnavailable(self._message(exc))
        if isinstance(exc, rexc.ResponseError):
            text = self._redact(str(exc))
            if "NOREPLICAS" in text:  # min-replicas-to-write refused it: not written
                return StoreUnavailable(self._message(exc))
            if "WRONGTYPE" in text:
                return WrongType(f"redis store {self.safe_url}: {text}")
            if "arguments for 'pexpire'" in text or "arguments for 'expire'" in text:
                # EXPIRE/PEXPIRE ... NX before Redis 7.0
                return StoreError(f"redis store {self.safe_url}: {text} (EXPIRE NX, which "
                                  "the Flask session's writes use, needs Redis 7.0 or later)")
            if "not an integer" in text or "would overflow" in text:
                return NotAnInteger(f"redis store {self.safe_url}: {text}")
            return StoreError(f"redis store {self.safe_url}: {text}")
        if isinstance(exc, rexc.RedisClusterException):
            if "cannot be connected" in str(exc) or "reachable" in str(exc):
                return StoreUnavailable(self._message(exc))
            return StoreError(f"redis store {self.safe_url}: {exc}")
        text = self._redact(str(exc))
        return StoreError(f"redis store {self.safe_url}: {type(exc).__name__}: {text}")

    # -- strings --------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        try:
            value: bytes | None = self._own.get(key)
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc
        return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        check_value(value)
        px = None if ttl is None else _ms(check_ttl(ttl))
        try:
            self._own.set(key, value, px=px)
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        try:
            return int(self._own.delete(*keys))
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    def incr(self, key: str, amount: int = 1) -> int:
        check_amount(amount)
        try:
            return int(self._own.incrby(key, amount))
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> bool:
        ms = _ms(check_ttl(ttl, allow_zero=True))
        try:
            if if_no_ttl:  # PEXPIRE ... NX: Redis 7.0+
                return bool(self._own.pexpire(key, ms, nx=True))
            return bool(self._own.pexpire(key, ms))
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    def ttl(self, key: str) -> float | None:
        try:
            return _ttl_result(self._own.pttl(key))
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    # -- hashes ---------------------------------------------------------------------

    def hgetall(self, key: str) -> dict[str, bytes]:
        try:
            return _decode_hash(self._own.hgetall(key))
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    def hset(self, key: str, mapping: dict[str, bytes]) -> int:
        for value in mapping.values():
            check_value(value)
        if not mapping:
            return 0
        try:
            return int(self._own.hset(key, mapping=mapping))
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    def hdel(self, key: str, *fields: str) -> int:
        if not fields:
            return 0
        try:
            return int(self._own.hdel(key, *fields))
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    # -- batch ----------------------------------------------------------------------

    def batch(self) -> RedisBatch:
        return RedisBatch(self)

    # -- locks: redis-py's Lock (SET NX PX to take, a compare-and-delete script to free)

    def _lock(self, name: str, timeout: float) -> Lock:
        return Lock(self.client, self.lock_prefix + name, timeout=_ms(timeout) / 1000,
                    sleep=LOCK_POLL, thread_local=False)

    def acquire(self, name: str, timeout: float, blocking_timeout: float | None = None) -> str | None:
        check_lock_timeout(timeout)
        token = secrets.token_hex(16)
        wait = None if blocking_timeout is None else max(0.0, blocking_timeout)
        try:
            got = self._lock(name, timeout).acquire(
                token=token, blocking=wait != 0, blocking_timeout=wait)
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc
        return token if got else None

    def release(self, name: str, token: str) -> bool:
        try:
            self._lock(name, 1.0).do_release(token)
        except rexc.LockNotOwnedError:
            return False
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc
        return True

    # -- lifecycle ------------------------------------------------------------------

    def ping(self) -> None:
        try:
            self._own.ping()
        except _REDIS_ERRORS as exc:
            raise self._mapped(exc) from exc

    def after_fork(self) -> None:
        """Forget inherited connections without touching their sockets (the parent owns them).

        redis-py's pools notice a fork by themselves (the pid check on checkout); this
        drops the inherited ones at once, and a lock another thread may have held.
        """
        self._client_lock = threading.Lock()
        self._held = threading.local()
        self._holds_left = self._hold_limit
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
        clients = [self._client] if self._client is not None else []
        if self._sentinel is not None:
            clients.extend(self._sentinel.sentinels)
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
        self._held = threading.local()  # every thread's held client goes with it
        self._holds_left = self._hold_limit
        if self._factory is not None:
            self._client = None

    def __repr__(self) -> str:
        return f"<RedisStore {self.kind} {self.safe_url}>"


def _first(r: list[Any]) -> Any:
    return r[0]


def _none(_: list[Any]) -> None:
    return None


def _int(r: list[Any]) -> int:
    return int(r[0])


def _bool(r: list[Any]) -> bool:
    return bool(r[0])


def _hash(r: list[Any]) -> dict[str, bytes]:
    return _decode_hash(r[0])


def _pttl(r: list[Any]) -> float | None:
    return _ttl_result(r[0])


def _sum(r: list[Any]) -> int:
    return sum(int(x) for x in r)


def _zero(_: list[Any]) -> int:
    return 0


class RedisBatch(Batch):
    """A redis-py pipeline with ``transaction=False``: one round trip, commands in order,
    results converted like the plain methods. A batch of one command is sent as that
    plain command (the same round trip, without the pipeline's own cost).

    Not MULTI/EXEC: a batch is not isolated from other clients' commands (each command
    is atomic on its own), which is what the session's load and save need. Every
    command runs; if some fail, the first error is raised after all replies are read.
    In cluster mode a batch touching one session key stays in one slot; a multi-key
    ``delete`` is queued as one DEL per key.
    """

    __slots__ = ("_store", "_cmds", "_ops")

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        # redis-py command calls: (method name, positional args, keyword args)
        self._cmds: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        # per queued method: how many commands it queued, and its converter
        self._ops: list[tuple[int, Callable[[list[Any]], Any]]] = []

    def _add(self, convert: Callable[[list[Any]], Any], name: str, *args: Any,
             **kwargs: Any) -> RedisBatch:
        self._cmds.append((name, args, kwargs))
        self._ops.append((1, convert))
        return self

    def _const(self, convert: Callable[[list[Any]], Any]) -> RedisBatch:
        self._ops.append((0, convert))
        return self

    def get(self, key: str) -> RedisBatch:
        return self._add(_first, "get", key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> RedisBatch:
        check_value(value)
        return self._add(_none, "set", key, value, px=None if ttl is None else _ms(check_ttl(ttl)))

    def delete(self, *keys: str) -> RedisBatch:
        if not keys:
            return self._const(_zero)
        if self._store.kind == "cluster" and len(keys) > 1:
            for key in keys:
                self._cmds.append(("delete", (key,), {}))
            self._ops.append((len(keys), _sum))
            return self
        return self._add(_int, "delete", *keys)

    def incr(self, key: str, amount: int = 1) -> RedisBatch:
        return self._add(_int, "incrby", key, check_amount(amount))

    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> RedisBatch:
        ms = _ms(check_ttl(ttl, allow_zero=True))
        if if_no_ttl:  # PEXPIRE ... NX: Redis 7.0+
            return self._add(_bool, "pexpire", key, ms, nx=True)
        return self._add(_bool, "pexpire", key, ms)

    def ttl(self, key: str) -> RedisBatch:
        """Not in the :class:`Batch` interface, but handy: PTTL as seconds or None."""
        return self._add(_pttl, "pttl", key)

    def hgetall(self, key: str) -> RedisBatch:
        return self._add(_hash, "hgetall", key)

    def hset(self, key: str, mapping: dict[str, bytes]) -> RedisBatch:
        for value in mapping.values():
            check_value(value)
        if not mapping:
            return self._const(_zero)
        return self._add(_int, "hset", key, mapping=mapping)

    def hdel(self, key: str, *fields: str) -> RedisBatch:
        if not fields:
            return self._const(_zero)
        return self._add(_int, "hdel", key, *fields)

    def execute(self) -> list[Any]:
        cmds, self._cmds = self._cmds, []
        ops, self._ops = self._ops, []
        store = self._store
        raw: list[Any]
        try:
            if not cmds:
                raw = []
            elif len(cmds) == 1:
                name, args, kwargs = cmds[0]
                raw = [getattr(store._own, name)(*args, **kwargs)]
            else:
                pipe = store.client.pipeline(transaction=False)
                for name, args, kwargs in cmds:
                    getattr(pipe, name)(*args, **kwargs)
                raw = pipe.execute()
        except _REDIS_ERRORS as exc:
            raise store._mapped(exc) from exc
        results: list[Any] = []
        pos = 0
        for count, convert in ops:
            results.append(convert(raw[pos:pos + count]))
            pos += count
        return results
