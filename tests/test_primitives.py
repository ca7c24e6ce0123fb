"""Shared primitives (gunicorn_ext.state.primitives) on every backend: memory, SQLite,
fakeredis and a real redis-server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from flask import Flask

from gunicorn_ext.state import codec
from gunicorn_ext.state.flask import Session
from gunicorn_ext.state.primitives import Counter, LockTimeout, TTLCache, lock
from gunicorn_ext.state.redis import RedisStore
from gunicorn_ext.state.store import Store, StoreUnavailable, open_store


@pytest.fixture(params=["memory", "sqlite", "fakeredis", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "memory":
        s = open_store("memory://")
    elif request.param == "sqlite":
        s = open_store("sqlite:///" + str(tmp_path / "p.db"))
    elif request.param == "fakeredis":
        s = RedisStore("redis://fake", client=fakeredis.FakeRedis())
    else:
        s = open_store(request.getfixturevalue("redis_server").url)
    yield s
    s.close()


def test_counter(store: Store) -> None:
    c = Counter(store, "hits")
    assert c.get() == 0
    assert c.incr() == 1
    assert c.incr(5) == 6
    assert c.incr(-2) == 4
    assert c.get() == 4
    assert Counter(store, "hits").get() == 4  # same name, same counter
    c.reset()
    assert c.get() == 0
    assert c.incr() == 1


def test_counter_atomic_across_threads_and_connections(tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "c.db")
    stores = [open_store(url), open_store(url)]  # two stores: like two processes
    threads_per_store, per_thread = 4, 100
    errors: list[BaseException] = []

    def work(s: Store) -> None:
        try:
            c = Counter(s, "n")
            for _ in range(per_thread):
                c.incr()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,))
               for s in stores for _ in range(threads_per_store)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Counter(stores[0], "n").get() == 2 * threads_per_store * per_thread
    for s in stores:
        s.close()


def test_ttl_cache_get_set_delete_and_types(store: Store) -> None:
    cache = TTLCache(store, "c:", ttl=60)
    assert cache.get("missing") is None
    assert cache.get("missing", "dflt") == "dflt"
    value = {"t": (1, 2), "b": b"\x00", "u": uuid.uuid4(),
             "d": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "l": [None, 1.5]}
    cache.set("k", value)
    assert cache.get("k") == value
    assert store.get("c:k") is not None  # under the prefix
    ttl = store.ttl("c:k")
    assert ttl is not None and 50 < ttl <= 60
    cache.set("none", None)
    assert cache.get("none", "dflt") is None  # a cached None is a hit
    assert cache.delete("k") is True
    assert cache.delete("k") is False
    assert cache.get("k") is None
    store.set("c:corrupt", b"\xff not json")
    assert cache.get("corrupt", "miss") == "miss"
    # One codec for app values, the sessions' (state/codec.py): plain JSON when exact.
    cache.set("plain", {"a": [1, "x"]})
    assert store.get("c:plain") == b'{"a":[1,"x"]}' == codec.dumps({"a": [1, "x"]})
    cache.set("tagged", (1, b"\x00"))
    raw = store.get("c:tagged")
    assert raw is not None and raw.startswith(codec.TAGGED) and codec.loads(raw) == (1, b"\x00")
    with pytest.raises(ValueError):
        TTLCache(store, "c:", ttl=0)


def test_ttl_cache_expiry(store: Store) -> None:
    cache = TTLCache(store, "c:", ttl=0.3)
    cache.set("a", 1)
    cache.set("b", 2, ttl=60)
    assert cache.get("a") == 1
    time.sleep(0.5)
    assert cache.get("a") is None
    assert cache.get("b") == 2


def test_memoize(store: Store) -> None:
    cache = TTLCache(store, "m:", ttl=60)
    calls: list[tuple[Any, ...]] = []

    @cache.memoize(ttl=0.3)
    def add(a: int, b: int = 0) -> tuple[int, int]:
        calls.append((a, b))
        return (a + b, len(calls))

    assert add(1, 2) == (3, 1)
    assert add(1, 2) == (3, 1)  # cached, a tuple again
    assert add(1, b=2) == (3, 2)  # other arguments, other key
    assert add(2, 1) == (3, 3)
    assert len(calls) == 3
    add.invalidate(1, 2)  # type: ignore[attr-defined]
    assert add(1, 2) == (3, 4)
    time.sleep(0.5)
    assert add(2, 1) == (3, 5)  # expired
    assert add.__name__ == "add"

    nones: list[int] = []

    @cache.memoize
    def nothing(x: int) -> None:
        nones.append(x)

    nothing(1)
    nothing(1)
    assert nones == [1]  # None results are cached too


def test_memoize_keys_differ_by_function(store: Store) -> None:
    cache = TTLCache(store, "m:", ttl=60)

    @cache.memoize()
    def f(x: int) -> str:
        return "f"

    @cache.memoize()
    def g(x: int) -> str:
        return "g"

    assert (f(1), g(1)) == ("f", "g")
    assert f.cache_key(1) != g.cache_key(1)  # type: ignore[attr-defined]
    assert f.cache_key(1) != f.cache_key(2)  # type: ignore[attr-defined]


def test_lock(store: Store) -> None:
    with lock(store, "job", timeout=5, blocking_timeout=0) as token:
        assert token
        with pytest.raises(LockTimeout):
            with lock(store, "job", timeout=5, blocking_timeout=0):
                pass
    with lock(store, "job", timeout=5, blocking_timeout=0):
        pass
    # a lock frees itself after its timeout (its holder died)
    assert store.acquire("dead", timeout=0.2, blocking_timeout=0)
    with lock(store, "dead", timeout=5, blocking_timeout=2):
        pass


def test_primitives_outage_is_503_in_a_flask_app(store: Store) -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k")
    Session(app, store=store)

    @app.get("/count")
    def count() -> str:
        return str(Counter(store, "c").incr())

    client = app.test_client()
    assert client.get("/count").text == "1"

    def broken(key: str, amount: int = 1) -> int:
        raise StoreUnavailable("down")

    store.incr = broken  # type: ignore[method-assign]
    r = client.get("/count")
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json == {"error": "session store unavailable"}
