"""Shared primitives for app code, the same on every backend (Redis, SQLite, memory).

* :class:`Counter` -- an atomic counter shared by all workers and machines::

      hits = Counter(store, "hits")
      hits.incr()        # -> the new value, atomically
      hits.get()         # -> current value (0 when never incremented)
      hits.reset()

* :class:`TTLCache` -- a cache whose entries expire; values in the store's one codec
  (:mod:`gunicorn_ext.state.codec`, as sessions store them: JSON, or Flask's tagged JSON
  so tuple, bytes, datetime, UUID, Markup round-trip; never pickle)::

      cache = TTLCache(store, "cache:", ttl=60)
      cache.set("k", {"a": 1}); cache.get("k"); cache.delete("k")

      @cache.memoize(ttl=30)
      def report(user_id): ...
      report.invalidate(42)   # forget report(42)

* Locks: ``with store.lock("job", timeout=30, blocking_timeout=5):`` -- held at most
  ``timeout`` seconds (it frees itself if the holder dies), :class:`LockTimeout` when not
  had within ``blocking_timeout`` (None: wait forever, 0: don't wait). :func:`lock` is
  the same as a function.

Every call raises :class:`~gunicorn_ext.state.store.StoreUnavailable` when the backend can't be
reached (a Flask app using :class:`gunicorn_ext.state.flask.Session` answers it with a 503).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar, overload

from .codec import dumps, loads
from .store import LockTimeout, Store, StoreUnavailable

__all__ = ["Counter", "TTLCache", "lock", "LockTimeout", "StoreUnavailable"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class Counter:
    """An atomic integer counter stored under the key ``name``."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name

    def incr(self, n: int = 1) -> int:
        """Add ``n`` atomically (a negative ``n`` subtracts); return the new value."""
        return self.store.incr(self.name, n)

    def get(self) -> int:
        raw = self.store.get(self.name)
        return 0 if raw is None else int(raw)

    def reset(self) -> None:
        self.store.delete(self.name)

    def __repr__(self) -> str:
        return f"Counter({self.name!r})"


class _Memoized:
    """A function whose results are cached in a :class:`TTLCache`."""

    def __init__(self, cache: TTLCache, func: Callable[..., Any], ttl: float | None) -> None:
        self.cache = cache
        self.func = func
        self.ttl = ttl
        functools.update_wrapper(self, func)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        """The cache key of the call ``func(*args, **kwargs)``."""
        name = f"{getattr(self.func, '__module__', '?')}.{getattr(self.func, '__qualname__', repr(self.func))}"
        digest = hashlib.sha256(repr((args, sorted(kwargs.items()))).encode()).hexdigest()
        return f"memo:{name}:{digest}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.cache_key(*args, **kwargs)
        found, value = self.cache._lookup(key)
        if found:
            return value
        value = self.func(*args, **kwargs)
        self.cache.set(key, value, ttl=self.ttl)
        return value

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Forget the cached result of ``func(*args, **kwargs)``."""
        self.cache.delete(self.cache_key(*args, **kwargs))


class TTLCache:
    """Values under ``prefix + key`` that expire after ``ttl`` seconds."""

    def __init__(self, store: Store, prefix: str = "cache:", ttl: float = 300.0) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.store = store
        self.prefix = prefix
        self.ttl = ttl

    def _lookup(self, key: str) -> tuple[bool, Any]:
        raw = self.store.get(self.prefix + key)
        if raw is None:
            return False, None
        try:
            return True, loads(raw)
        except Exception:  # not ours, or corrupt: a miss
            log.warning("cache entry %r could not be decoded; treated as a miss",
                        self.prefix + key)
            return False, None

    def get(self, key: str, default: Any = None) -> Any:
        found, value = self._lookup(key)
        return value if found else default

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Cache ``value`` for ``ttl`` seconds (default: the cache's)."""
        self.store.set(self.prefix + key, dumps(value), ttl=self.ttl if ttl is None else ttl)

    def delete(self, key: str) -> bool:
        return self.store.delete(self.prefix + key) > 0

    @overload
    def memoize(self, func: F, *, ttl: float | None = None) -> F: ...

    @overload
    def memoize(self, func: None = None, *, ttl: float | None = None) -> Callable[[F], F]: ...

    def memoize(self, func: Callable[..., Any] | None = None, *,
                ttl: float | None = None) -> Any:
        """``@cache.memoize`` or ``@cache.memoize(ttl=30)``: cache results by function
        name and the repr of the arguments (hashed). ``f.invalidate(*args)`` forgets one."""
        def decorate(f: Callable[..., Any]) -> Any:
            return _Memoized(self, f, ttl)

        return decorate if func is None else decorate(func)


def lock(store: Store, name: str, timeout: float = 10.0,
         blocking_timeout: float | None = None) -> AbstractContextManager[str]:
    """``with lock(store, "job", timeout=30, blocking_timeout=5):`` -- the same as
    ``store.lock(...)``: held at most ``timeout`` seconds, raises :class:`LockTimeout`
    when not acquired within ``blocking_timeout``."""
    return store.lock(name, timeout=timeout, blocking_timeout=blocking_timeout)
