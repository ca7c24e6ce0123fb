"""An in-process store: a dict with monotonic-time expiry.

One process only: each Gunicorn worker would have its own copy, so counters, sessions
and locks are *not* shared between workers. Use it for development and tests; use
``sqlite:///path`` (one machine) or Redis (many machines) in production.

Thread-safe (one :class:`threading.Lock` around everything), so gthread workers and
threaded dev servers are fine. Semantics are those of every backend (see
:mod:`gunicorn_ext.state.store`); a batch runs under the lock, so no other thread sees
it half done.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from .store import (
    Batch,
    Store,
    StoreError,
    WrongType,
    add_counter,
    check_amount,
    check_lock_timeout,
    check_ttl,
    check_value,
    parse_counter,
)


def _wrongtype(key: str) -> WrongType:
    return WrongType(f"WRONGTYPE: key {key!r} holds a value of another type")


class _Entry:
    __slots__ = ("value", "expires")

    def __init__(self, value: bytes | dict[str, bytes], expires: float | None = None) -> None:
        self.value = value
        self.expires = expires


class MemoryBatch(Batch):
    """Queued commands run in order under the store's lock (no other thread sees a
    partial batch). Every command runs; the first error is raised after."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._ops: list[tuple[str, tuple[Any, ...]]] = []

    def _add(self, name: str, *args: Any) -> MemoryBatch:
        self._ops.append((name, args))
        return self

    def get(self, key: str) -> MemoryBatch:
        return self._add("get", key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> MemoryBatch:
        check_value(value)
        return self._add("set", key, value, None if ttl is None else check_ttl(ttl))

    def delete(self, *keys: str) -> MemoryBatch:
        return self._add("delete", *keys)

    def incr(self, key: str, amount: int = 1) -> MemoryBatch:
        return self._add("incr", key, check_amount(amount))

    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> MemoryBatch:
        return self._add("expire", key, check_ttl(ttl, allow_zero=True), bool(if_no_ttl))

    def hgetall(self, key: str) -> MemoryBatch:
        return self._add("hgetall", key)

    def hset(self, key: str, mapping: dict[str, bytes]) -> MemoryBatch:
        for value in mapping.values():
            check_value(value)
        return self._add("hset", key, dict(mapping))

    def hdel(self, key: str, *fields: str) -> MemoryBatch:
        return self._add("hdel", key, *fields)

    def execute(self) -> list[Any]:
        ops, self._ops = self._ops, []
        store = self._store
        results: list[Any] = []
        error: StoreError | None = None
        with store._cond:
            now = time.monotonic()
            for name, args in ops:
                try:
                    results.append(getattr(store, "_" + name)(now, *args))
                except StoreError as exc:
                    error = error or exc
                    results.append(exc)
        if error is not None:
            raise error
        return results


class MemoryStore(Store):
    """``memory://``: one process only (each Gunicorn worker has its own copy); for
    development and tests."""

    def __init__(self, url: str = "memory://", **options: Any) -> None:
        if options:
            raise TypeError(f"MemoryStore takes no options, got {sorted(options)}")
        self.url = url
        self._data: dict[str, _Entry] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._cond = threading.Condition(threading.Lock())

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"

    # -- helpers (called with the lock held)
    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry.expires is not None and entry.expires <= now:
            del self._data[key]
            return None
        return entry

    def _string(self, key: str, now: float) -> _Entry | None:
        entry = self._live(key, now)
        if entry is not None and not isinstance(entry.value, bytes):
            raise _wrongtype(key)
        return entry

    def _hash(self, key: str, now: float) -> dict[str, bytes] | None:
        entry = self._live(key, now)
        if entry is None:
            return None
        if not isinstance(entry.value, dict):
            raise _wrongtype(key)
        return entry.value

    def _get(self, now: float, key: str) -> bytes | None:
        entry = self._string(key, now)
        return None if entry is None else entry.value  # type: ignore[return-value]

    def _set(self, now: float, key: str, value: bytes, ttl: float | None) -> None:
        self._data[key] = _Entry(bytes(value), None if ttl is None else now + ttl)

    def _delete(self, now: float, *keys: str) -> int:
        n = 0
        for key in keys:
            if self._live(key, now) is not None:
                del self._data[key]
                n += 1
        return n

    def _incr(self, now: float, key: str, amount: int) -> int:
        entry = self._string(key, now)
        if entry is None:
            self._data[key] = _Entry(str(amount).encode())
            return amount
        assert isinstance(entry.value, bytes)
        new = add_counter(key, parse_counter(key, entry.value), amount)
        entry.value = str(new).encode()
        return new

    def _expire(self, now: float, key: str, ttl: float, if_no_ttl: bool = False) -> bool:
        entry = self._live(key, now)
        if entry is None or (if_no_ttl and entry.expires is not None):
            return False
        if ttl <= 0:
            del self._data[key]
        else:
            entry.expires = now + ttl
        return True

    def _ttl(self, now: float, key: str) -> float | None:
        entry = self._live(key, now)
        if entry is None or entry.expires is None:
            return None
        return max(0.0, entry.expires - now)

    def _hgetall(self, now: float, key: str) -> dict[str, bytes]:
        h = self._hash(key, now)
        return {} if h is None else dict(h)

    def _hset(self, now: float, key: str, mapping: dict[str, bytes]) -> int:
        if not mapping:
            return 0
        h = self._hash(key, now)
        if h is None:
            self._data[key] = _Entry({f: bytes(v) for f, v in mapping.items()})
            return len(mapping)
        created = sum(1 for f in mapping if f not in h)
        h.update((f, bytes(v)) for f, v in mapping.items())
        return created

    def _hdel(self, now: float, key: str, *fields: str) -> int:
        h = self._hash(key, now)
        if h is None:
            return 0
        n = 0
        for f in fields:
            if h.pop(f, None) is not None:
                n += 1
        if not h:
            del self._data[key]
        return n

    def _call(self, name: str, *args: Any) -> Any:
        with self._cond:
            return getattr(self, "_" + name)(time.monotonic(), *args)

    # -- strings
    def get(self, key: str) -> bytes | None:
        return self._call("get", key)  # type: ignore[no-any-return]

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        check_value(value)
        self._call("set", key, value, None if ttl is None else check_ttl(ttl))

    def delete(self, *keys: str) -> int:
        return self._call("delete", *keys)  # type: ignore[no-any-return]

    def incr(self, key: str, amount: int = 1) -> int:
        return self._call("incr", key, check_amount(amount))  # type: ignore[no-any-return]

    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> bool:
        return self._call("expire", key, check_ttl(ttl, allow_zero=True),  # type: ignore[no-any-return]
                          bool(if_no_ttl))

    def ttl(self, key: str) -> float | None:
        return self._call("ttl", key)  # type: ignore[no-any-return]

    # -- hashes
    def hgetall(self, key: str) -> dict[str, bytes]:
        return self._call("hgetall", key)  # type: ignore[no-any-return]

    def hset(self, key: str, mapping: dict[str, bytes]) -> int:
        for value in mapping.values():
            check_value(value)
        return self._call("hset", key, dict(mapping))  # type: ignore[no-any-return]

    def hdel(self, key: str, *fields: str) -> int:
        return self._call("hdel", key, *fields)  # type: ignore[no-any-return]

    def batch(self) -> MemoryBatch:
        return MemoryBatch(self)

    # -- locks
    def acquire(self, name: str, timeout: float, blocking_timeout: float | None = None) -> str | None:
        check_lock_timeout(timeout)
        token = secrets.token_hex(16)
        deadline = None if blocking_timeout is None else time.monotonic() + blocking_timeout
        with self._cond:
            while True:
                now = time.monotonic()
                held = self._locks.get(name)
                if held is None or held[1] <= now:
                    self._locks[name] = (token, now + timeout)
                    return token
                if deadline is not None and now >= deadline:
                    return None
                # Wake on release, or when the holder's lock expires, or at the deadline.
                wait = held[1] - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
                self._cond.wait(max(wait, 0.001))

    def release(self, name: str, token: str) -> bool:
        with self._cond:
            held = self._locks.get(name)
            if held is None or held[0] != token:
                return False
            del self._locks[name]
            self._cond.notify_all()
            return held[1] > time.monotonic()

    # -- lifecycle
    def ping(self) -> None:
        pass

    def after_fork(self) -> None:
        # A thread may have held the lock at fork time: the child gets a fresh one.
        self._cond = threading.Condition(threading.Lock())

    def close(self) -> None:
        pass
