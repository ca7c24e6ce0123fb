"""The one small store interface every backend implements, and URL dispatch.

Apps and the Flask session use only this surface, so the same code runs on
Redis (many machines) and SQLite (one machine, the embedded default):

* strings: :meth:`Store.get`, :meth:`Store.set` (with TTL), :meth:`Store.delete`,
  :meth:`Store.incr` (atomic), :meth:`Store.expire` (touch), :meth:`Store.ttl`;
* hashes: :meth:`Store.hgetall`, :meth:`Store.hset`, :meth:`Store.hdel`;
* :meth:`Store.lock`, a lock with a timeout that frees itself if its holder dies;
* :meth:`Store.batch`, several commands in one round trip where the backend allows.

Values are bytes, keys are str. Every backend raises :class:`StoreUnavailable`
(and nothing backend-specific) when it can't be reached, so callers can answer
503 without knowing which backend runs.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit


class StoreError(Exception):
    """Base class of store errors."""


class StoreUnavailable(StoreError):
    """The backend can't be reached (down, timed out, connection refused)."""


class LockTimeout(StoreError):
    """A lock could not be acquired within its blocking timeout."""


class Batch(abc.ABC):
    """Commands queued to run together, in order, in one round trip.

    Methods return the batch so calls chain; :meth:`execute` returns one
    result per command, as the plain methods would.
    """

    @abc.abstractmethod
    def get(self, key: str) -> Batch: ...

    @abc.abstractmethod
    def set(self, key: str, value: bytes, ttl: float | None = None) -> Batch: ...

    @abc.abstractmethod
    def delete(self, *keys: str) -> Batch: ...

    @abc.abstractmethod
    def incr(self, key: str, amount: int = 1) -> Batch: ...

    @abc.abstractmethod
    def expire(self, key: str, ttl: float) -> Batch: ...

    @abc.abstractmethod
    def hgetall(self, key: str) -> Batch: ...

    @abc.abstractmethod
    def hset(self, key: str, mapping: dict[str, bytes]) -> Batch: ...

    @abc.abstractmethod
    def hdel(self, key: str, *fields: str) -> Batch: ...

    @abc.abstractmethod
    def execute(self) -> list[Any]: ...


class Store(abc.ABC):
    """A key-value store with TTLs, hashes, atomic counters and locks."""

    url: str

    # -- strings
    @abc.abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value``; with ``ttl`` (seconds) it expires, without it it never does."""

    @abc.abstractmethod
    def delete(self, *keys: str) -> int:
        """Remove keys of any type; return how many existed."""

    @abc.abstractmethod
    def incr(self, key: str, amount: int = 1) -> int:
        """Atomically add ``amount`` (a missing key counts as 0); return the new value."""

    @abc.abstractmethod
    def expire(self, key: str, ttl: float) -> bool:
        """Set the key's time to live (seconds); False if it does not exist."""

    @abc.abstractmethod
    def ttl(self, key: str) -> float | None:
        """Seconds left; None when the key has no TTL or does not exist."""

    # -- hashes (a session is one hash: a field per top-level key)
    @abc.abstractmethod
    def hgetall(self, key: str) -> dict[str, bytes]: ...

    @abc.abstractmethod
    def hset(self, key: str, mapping: dict[str, bytes]) -> None: ...

    @abc.abstractmethod
    def hdel(self, key: str, *fields: str) -> int: ...

    # -- several commands, one round trip
    @abc.abstractmethod
    def batch(self) -> Batch: ...

    # -- locks
    @abc.abstractmethod
    def acquire(self, name: str, timeout: float, blocking_timeout: float | None = None) -> str | None:
        """Take lock ``name`` for at most ``timeout`` seconds (it frees itself after).

        Wait up to ``blocking_timeout`` seconds (None: forever, 0: don't wait).
        Return a token for :meth:`release`, or None if not acquired in time.
        """

    @abc.abstractmethod
    def release(self, name: str, token: str) -> bool:
        """Release the lock if ``token`` still holds it; False if it had expired."""

    @contextmanager
    def lock(self, name: str, timeout: float = 10.0,
             blocking_timeout: float | None = None) -> Iterator[str]:
        """``with store.lock("job", timeout=30):`` raises :class:`LockTimeout` when
        the lock is not had within ``blocking_timeout``."""
        token = self.acquire(name, timeout, blocking_timeout)
        if token is None:
            raise LockTimeout(f"lock {name!r} not acquired within {blocking_timeout}s")
        try:
            yield token
        finally:
            self.release(name, token)

    # -- lifecycle
    @abc.abstractmethod
    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the backend answers."""

    def after_fork(self) -> None:  # noqa: B027 - optional: most backends need nothing
        """Drop connections inherited across a fork (the child opens its own)."""

    def close(self) -> None:  # noqa: B027 - optional: most backends need nothing
        """Release connections."""


def open_store(url: str, **options: Any) -> Store:
    """The store for ``url``.

    ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``,
    ``redis+cluster://``: Redis (redis-py); ``sqlite:///path``: SQLite in WAL mode;
    ``memory://``: one process only, for development and tests.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel",
                  "redis+cluster", "rediss+cluster"):
        from .redis import RedisStore

        return RedisStore(url, **options)
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url, **options)
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(url, **options)
    raise ValueError(
        f"unsupported store URL {url!r}: use redis://, rediss://, unix://, redis+sentinel://, "
        "redis+cluster://, sqlite:///path or memory://")
