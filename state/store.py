"""The one small store interface every backend implements, and URL dispatch.

Apps and the Flask session use only this surface, so the same code runs on
Redis (many machines) and SQLite (one machine, the embedded default):

* strings: :meth:`Store.get`, :meth:`Store.set` (with TTL), :meth:`Store.delete`,
  :meth:`Store.incr` (atomic), :meth:`Store.expire` (touch; or only if no TTL yet),
  :meth:`Store.ttl`;
* hashes: :meth:`Store.hgetall`, :meth:`Store.hset`, :meth:`Store.hdel`;
* :meth:`Store.lock`, a lock with a timeout that frees itself if its holder dies;
* :meth:`Store.batch`, several commands in one round trip where the backend allows.

Values are bytes, keys are str. Every backend raises :class:`StoreUnavailable`
(and nothing backend-specific) when it can't be reached, so callers can answer
503 without knowing which backend runs.

One semantics on every backend (Redis's, pinned by ``tests/store_contract.py``):

* ``set`` replaces a key of any type and clears its TTL; ``incr`` and ``hset`` keep it;
  a TTL covers a whole hash; removing a hash's last field removes the key; ``hset``
  returns how many of its fields it created (0 for an empty mapping);
* a TTL given to ``set`` (and a lock's ``timeout``) must be a finite number > 0, else
  :class:`ValueError` before anything is sent; ``expire(key, 0)`` (or less) deletes;
  ``expire(key, ttl, if_no_ttl=True)`` leaves a key that has a TTL as it is;
* a value that is not ``bytes`` raises :class:`TypeError` before anything is sent;
* using a string as a hash or the reverse raises :class:`WrongType`;
* ``incr`` of a value that is not a canonical decimal integer, or past the signed
  64-bit range, raises :class:`NotAnInteger`;
* a batch runs every command in order; if some fail, the first error is raised after
  all have run (the others stay applied). Argument errors are raised while queuing;
* lock names live apart from keys.

This module imports no backend: :func:`open_store` imports the one a URL names.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StoreError(Exception):
    """Base class of store errors."""


class StoreUnavailable(StoreError):
    """The backend can't be reached (down, timed out, connection refused)."""


class LockTimeout(StoreError):
    """A lock could not be acquired within its blocking timeout."""


class WrongType(StoreError, TypeError):
    """The key holds a value of another type: a string used as a hash or the reverse
    (Redis's WRONGTYPE)."""


class NotAnInteger(StoreError, ValueError):
    """``incr`` of a value that is not a decimal integer, or a result (or amount)
    outside the signed 64-bit range."""


def check_ttl(ttl: float, allow_zero: bool = False) -> float:
    """``ttl`` if it is a finite number > 0 (>= any number with ``allow_zero``, for
    ``expire``, where <= 0 deletes), else :class:`ValueError`. Shared by every backend."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ValueError(f"ttl must be a finite number of seconds, got {ttl!r}")
    if ttl <= 0 and not allow_zero:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
    return ttl


def check_lock_timeout(timeout: float) -> float:
    """A lock's ``timeout`` if it is a finite number > 0, else :class:`ValueError`."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"lock timeout must be a positive number of seconds, got {timeout!r}")
    return timeout


def check_value(value: bytes) -> bytes:
    """``value`` if it is ``bytes``, else :class:`TypeError` (values are bytes everywhere)."""
    if not isinstance(value, bytes):
        raise TypeError(f"store values are bytes, not {type(value).__name__}")
    return value


_DIGITS = frozenset(b"0123456789")


def parse_counter(key: str, value: bytes) -> int:
    """The integer a counter string holds, as Redis reads it: canonical decimal (no
    sign but ``-``, no leading zeros, no spaces) in the signed 64-bit range."""
    digits = value[1:] if value[:1] == b"-" else value
    if (not digits or not _DIGITS.issuperset(digits) or (digits[:1] == b"0" and value != b"0")
            or len(digits) > 19):
        raise NotAnInteger(f"value of key {key!r} is not an integer")
    n = int(value)
    if not INT64_MIN <= n <= INT64_MAX:
        raise NotAnInteger(f"value of key {key!r} is not an integer in the 64-bit range")
    return n


def add_counter(key: str, current: int, amount: int) -> int:
    """``current + amount``, or :class:`NotAnInteger` if it leaves the 64-bit range."""
    new = current + amount
    if not INT64_MIN <= new <= INT64_MAX:
        raise NotAnInteger(f"incr of key {key!r} would overflow")
    return new


def check_amount(amount: int) -> int:
    """An ``incr`` amount: an int (:class:`TypeError`) in the signed 64-bit range
    (:class:`NotAnInteger`)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"incr amount must be an int, not {type(amount).__name__}")
    if not INT64_MIN <= amount <= INT64_MAX:
        raise NotAnInteger(f"incr amount {amount} is outside the signed 64-bit range")
    return amount


class Batch(abc.ABC):
    """Commands queued to run together, in order, in one round trip.

    Methods return the batch so calls chain; :meth:`execute` returns one
    result per command, as the plain methods would. Every command runs; if some
    fail (:class:`WrongType`, :class:`NotAnInteger`) the others stay applied and the
    first error is raised. A batch is not isolated from other clients on Redis (a
    pipeline, not MULTI/EXEC); on SQLite and memory it happens to be.
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
    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> Batch: ...

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
    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> bool:
        """Set the key's time to live (seconds); False if it does not exist.

        With ``if_no_ttl``, only a key that has no TTL gets one (Redis's ``EXPIRE NX``):
        True if it was set, False for a missing key or one that already had a TTL. A
        write that must not leave a key without a TTL queues it after the write, and
        learns from it whether the write created the key.
        """

    @abc.abstractmethod
    def ttl(self, key: str) -> float | None:
        """Seconds left; None when the key has no TTL or does not exist."""

    # -- hashes (a session is one hash: a field per top-level key)
    @abc.abstractmethod
    def hgetall(self, key: str) -> dict[str, bytes]: ...

    @abc.abstractmethod
    def hset(self, key: str, mapping: dict[str, bytes]) -> int:
        """Set the fields of hash ``key`` (its TTL is kept); return how many of them
        did not exist before (Redis's ``HSET`` reply), so a writer that knows which
        fields it loaded learns from it whether the key vanished meanwhile."""

    @abc.abstractmethod
    def hdel(self, key: str, *fields: str) -> int: ...

    # -- several commands, one round trip
    @abc.abstractmethod
    def batch(self) -> Batch: ...

    # -- locks
    @abc.abstractmethod
    def acquire(self, name: str, timeout: float, blocking_timeout: float | None = None) -> str | None:
        """Take lock ``name`` for at most ``timeout`` seconds (it frees itself after;
        a finite number > 0, else :class:`ValueError`).

        Wait up to ``blocking_timeout`` seconds (None: forever, 0 or less: don't wait).
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
