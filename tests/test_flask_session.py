"""Flask server-side sessions (gunicorn_ext.state.flask) over memory:// and sqlite:// stores."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, jsonify, session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from itsdangerous import TimestampSigner
from markupsafe import Markup

from gunicorn_ext.state.flask import (
    SALT,
    ServerSession,
    Session,
    SessionTooLarge,
    StoreSessionInterface,
)
from gunicorn_ext.state.store import Batch, Store, StoreUnavailable, open_store

# -- a store wrapper that records every call (and can be switched off) -------------------


class RecordingBatch(Batch):
    def __init__(self, owner: RecordingStore) -> None:
        self.owner = owner
        self.ops: list[tuple[Any, ...]] = []

    def _add(self, *op: Any) -> RecordingBatch:
        self.ops.append(op)
        return self

    def get(self, key: str) -> Batch:
        return self._add("get", key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> Batch:
        return self._add("set", key, value, ttl)

    def delete(self, *keys: str) -> Batch:
        return self._add("delete", *keys)

    def incr(self, key: str, amount: int = 1) -> Batch:
        return self._add("incr", key, amount)

    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> Batch:
        return self._add("expire", key, ttl, *(("if_no_ttl",) if if_no_ttl else ()))

    def hgetall(self, key: str) -> Batch:
        return self._add("hgetall", key)

    def hset(self, key: str, mapping: dict[str, bytes]) -> Batch:
        return self._add("hset", key, dict(mapping))

    def hdel(self, key: str, *fields: str) -> Batch:
        return self._add("hdel", key, *fields)

    def execute(self) -> list[Any]:
        self.owner._check()
        self.owner.calls.append(("batch", self.ops))
        inner = self.owner.inner.batch()
        for name, *args in self.ops:
            if args[-1:] == ["if_no_ttl"]:
                getattr(inner, name)(*args[:-1], if_no_ttl=True)
            else:
                getattr(inner, name)(*args)
        return inner.execute()


class RecordingStore(Store):
    """Delegates to ``inner``, records calls; raises StoreUnavailable while ``down``."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: list[tuple[Any, ...]] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("store is down (test)")

    def _do(self, name: str, *args: Any) -> Any:
        self._check()
        self.calls.append((name, *args))
        return getattr(self.inner, name)(*args)

    def get(self, key: str) -> bytes | None:
        return self._do("get", key)  # type: ignore[no-any-return]

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._do("set", key, value, ttl)

    def delete(self, *keys: str) -> int:
        return self._do("delete", *keys)  # type: ignore[no-any-return]

    def incr(self, key: str, amount: int = 1) -> int:
        return self._do("incr", key, amount)  # type: ignore[no-any-return]

    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> bool:
        if if_no_ttl:
            self._check()
            self.calls.append(("expire", key, ttl, "if_no_ttl"))
            return self.inner.expire(key, ttl, if_no_ttl=True)
        return self._do("expire", key, ttl)  # type: ignore[no-any-return]

    def ttl(self, key: str) -> float | None:
        return self._do("ttl", key)  # type: ignore[no-any-return]

    def hgetall(self, key: str) -> dict[str, bytes]:
        return self._do("hgetall", key)  # type: ignore[no-any-return]

    def hset(self, key: str, mapping: dict[str, bytes]) -> int:
        return self._do("hset", key, mapping)  # type: ignore[no-any-return]

    def hdel(self, key: str, *fields: str) -> int:
        return self._do("hdel", key, *fields)  # type: ignore[no-any-return]

    def batch(self) -> Batch:
        return RecordingBatch(self)

    def acquire(self, name: str, timeout: float, blocking_timeout: float | None = None) -> str | None:
        return self._do("acquire", name, timeout, blocking_timeout)  # type: ignore[no-any-return]

    def release(self, name: str, token: str) -> bool:
        return self._do("release", name, token)  # type: ignore[no-any-return]

    def ping(self) -> None:
        self._do("ping")


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "fakeredis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordingStore]:
    inner: Store
    if request.param == "fakeredis":  # the Redis store's code, in-process (fast)
        import fakeredis

        from gunicorn_ext.state.redis import RedisStore

        inner = RedisStore(client=fakeredis.FakeRedis())
    else:
        inner = open_store("memory://" if request.param == "memory"
                           else "sqlite:///" + str(tmp_path / "s.db"))
    yield RecordingStore(inner)
    inner.close()


def make_app(store: Store, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test-secret", TESTING=True, **config)
    Session(app, store=store)

    @app.get("/plain")
    def plain() -> str:
        return "plain"

    @app.get("/get/<key>")
    def get(key: str) -> Response:
        return jsonify(value=session.get(key))

    @app.get("/set/<key>/<value>")
    def set_(key: str, value: str) -> str:
        session[key] = value
        return "ok"

    @app.get("/rmw/<key>/<value>")
    def rmw(key: str, value: str) -> str:
        session.get(key)  # reads first: loads, then saves what changed
        session[key] = value
        return "ok"

    @app.get("/del/<key>")
    def del_(key: str) -> str:
        session.pop(key, None)
        return "ok"

    @app.get("/append/<value>")
    def append(value: str) -> str:
        session.setdefault("items", {"list": []})
        session["items"]["list"].append(value)  # nested: no session.modified needed
        return "ok"

    @app.get("/regenerate")
    def regenerate() -> str:
        session.regenerate()  # type: ignore[attr-defined]
        return "ok"

    @app.get("/destroy")
    def destroy() -> str:
        session.destroy()  # type: ignore[attr-defined]
        return "ok"

    @app.get("/big")
    def big() -> str:
        session["big"] = "x" * 100_000
        return "ok"

    return app


@pytest.fixture
def app(store: RecordingStore) -> Flask:
    return make_app(store)


def cookie_of(client: Any) -> str | None:
    c = client.get_cookie("session")
    return None if c is None else c.value  # type: ignore[no-any-return]


def sign(sid: str, key: str = "test-secret", permanent: bool = True) -> str:
    """A cookie value as the interface signs it (id.flag.timestamp.signature)."""
    return TimestampSigner(key, salt=SALT).sign(f"{sid}.{'p' if permanent else 's'}").decode()


def stored(store: RecordingStore, key: str) -> dict[str, bytes]:
    """The session's fields in the store, without the mark every stored session carries
    (see ``test_the_mark_beside_the_keys``)."""
    fields = store.inner.hgetall(key)
    fields.pop("\x00", None)
    return fields


def sid_of(app: Flask, client: Any) -> str:
    iface = app.session_interface
    assert isinstance(iface, StoreSessionInterface)
    sid = iface.sid_from_cookie(app, cookie_of(client))
    assert sid is not None
    return sid


def stored_session(app: Flask, store: RecordingStore) -> tuple[Any, str, float, str | None]:
    """A client whose session holds ``a=1``: the client, the session's key, its TTL and
    the cookie, with the store's recorded calls cleared."""
    client = app.test_client()
    client.get("/set/a/1")
    key = "session:" + sid_of(app, client)
    ttl = app.permanent_session_lifetime.total_seconds()
    first = cookie_of(client)
    store.calls.clear()
    return client, key, ttl, first


# -- tests ------------------------------------------------------------------------------------


def test_no_cookie_and_nothing_stored_until_a_write(app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    r = client.get("/plain")
    assert "Set-Cookie" not in r.headers and "Cookie" not in r.vary
    r = client.get("/get/a")
    assert r.json == {"value": None}
    assert "Set-Cookie" not in r.headers
    assert "Cookie" in r.vary
    assert store.calls == []  # no cookie: nothing to look up, nothing to write
    r = client.get("/set/a/1")
    assert "Set-Cookie" in r.headers
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert "Expires=" in cookie  # permanent by default
    assert client.get("/get/a").json == {"value": "1"}
    sid = sid_of(app, client)
    assert len(sid) >= 43  # 32 random bytes, urlsafe base64
    assert stored(store, "session:" + sid) == {"a": b'"1"'}
    ttl = store.inner.ttl("session:" + sid)
    assert ttl is not None and ttl > 30 * 86400


def test_tagged_types_round_trip(store: RecordingStore) -> None:
    app = make_app(store)
    values = {
        "markup": Markup("<b>hi</b>"),
        "dt": datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc),
        "bytes": b"\x00\xffbin",
        "tuple": (1, "two", (3,)),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "nested": {"d": {"k": [1, 2]}, "t": (b"x",)},
    }
    seen: dict[str, Any] = {}

    @app.get("/types/set")
    def types_set() -> str:
        session.update(values)
        return "ok"

    @app.get("/types/get")
    def types_get() -> str:
        seen.update(dict(session))
        return "ok"

    client = app.test_client()
    client.get("/types/set")
    client.get("/types/get")
    assert seen == values
    assert type(seen["markup"]) is Markup and type(seen["tuple"]) is tuple
    assert seen["dt"].tzinfo is not None
    for raw in stored(store, "session:" + sid_of(app, client)).values():
        body = raw[1:] if raw[:1] == b"\x01" else raw  # tagged JSON carries a marker byte
        json.loads(body)  # JSON, never pickle


def test_nested_mutation_saved_without_modified(app: Flask) -> None:
    client = app.test_client()
    client.get("/append/a")
    client.get("/append/b")
    with client.session_transaction() as sess:
        assert sess["items"] == {"list": ["a", "b"]}


def test_one_batch_to_load_one_to_save_only_changed_keys(app: Flask,
                                                         store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    client.get("/set/b/2")
    sid = sid_of(app, client)
    key = "session:" + sid
    ttl = app.permanent_session_lifetime.total_seconds()
    store.calls.clear()
    client.get("/rmw/b/3")
    assert store.calls == [  # the cookie is fresh: no TTL refresh due
        ("hgetall", key),
        # one plain HSET: it keeps the TTL, and its reply (0 fields created: b was
        # loaded) says the key was still there
        ("hset", key, {"b": b'"3"'}),
    ]
    store.calls.clear()
    client.get("/rmw/c/4")  # only a new field: the reply can't tell, EXPIRE NX rides along
    assert store.calls[1] == (
        "batch", [("hset", key, {"c": b'"4"'}), ("expire", key, ttl, "if_no_ttl")])
    store.calls.clear()
    client.get("/del/c")
    store.calls.clear()
    client.get("/rmw/b/3")  # same value: nothing to write (the sliding TTL is fresh)
    assert store.calls == [("hgetall", key)]
    store.calls.clear()
    client.get("/del/a")  # HDEL never creates the key: no guard
    assert store.calls[1] == ("batch", [("hdel", key, "a")])
    assert stored(store, key) == {"b": b'"3"'}
    left = store.inner.ttl(key)
    assert left is not None and left > ttl - 60
    store.calls.clear()
    client.get("/plain")  # never touched: no store access at all
    assert store.calls == []


def test_a_write_without_a_read_is_one_command(app: Flask, store: RecordingStore) -> None:
    """Assigning keys without reading the session first saves them without loading it,
    in one HSET: its reply (the stored mark was not new) says the session still
    existed, whether the key assigned is new to it or not."""
    seen: dict[str, Any] = {}

    @app.get("/write-then-read")
    def write_then_read() -> str:
        session["a"] = "new"
        seen.update(dict(session), new=session.new)  # type: ignore[attr-defined]
        return "ok"

    client = app.test_client()
    client.get("/set/a/1")
    key = "session:" + sid_of(app, client)
    cookie = cookie_of(client)
    store.calls.clear()
    r = client.get("/set/b/2")  # a key new to the session
    assert store.calls == [("hset", key, {"\x00": b"", "b": b'"2"'})]
    assert cookie_of(client) == cookie  # re-sent (Flask: modified), not re-signed
    assert "Expires=" in r.headers["Set-Cookie"] and "Cookie" in r.vary
    assert stored(store, key) == {"a": b'"1"', "b": b'"2"'}
    # A read after the write in the same request loads, and the write wins.
    store.calls.clear()
    client.get("/write-then-read")
    assert seen == {"a": "new", "b": "2", "new": False}
    assert store.calls == [("hgetall", key), ("hset", key, {"a": b'"new"'})]
    assert stored(store, key) == {"a": b'"new"', "b": b'"2"'}


def test_a_write_without_a_read_to_a_gone_session_gets_a_new_id(
        app: Flask, store: RecordingStore) -> None:
    """The session expired (or was deleted) since its cookie was signed: the write
    finds out from EXPIRE NX, and moves to a fresh id (one more round trip): an id the
    client brought is never given a new session."""
    client = app.test_client()
    client.get("/set/a/1")
    old_sid = sid_of(app, client)
    store.inner.delete("session:" + old_sid)  # expired
    store.calls.clear()
    client.get("/set/b/2")
    new_sid = sid_of(app, client)
    assert new_sid != old_sid
    old_key = "session:" + old_sid
    assert store.calls[:2] == [("hset", old_key, {"\x00": b"", "b": b'"2"'}),
                               ("expire", old_key, app.permanent_session_lifetime.total_seconds(),
                                "if_no_ttl")]
    assert [c[0] for c in store.calls[2:]] == ["batch"]
    assert stored(store, "session:" + old_sid) == {}
    assert stored(store, "session:" + new_sid) == {"b": b'"2"'}
    left = store.inner.ttl("session:" + new_sid)
    assert left is not None and left > 30 * 86400
    assert client.get("/get/a").json == {"value": None}
    assert client.get("/get/b").json == {"value": "2"}


def test_the_mark_beside_the_keys(app: Flask, store: RecordingStore) -> None:
    """A stored session carries the mark (field "\\x00", empty) from its creation: the
    app never sees it, can't assign it, and a session stored without it (by an earlier
    version) still takes a write without a read, in one more command."""
    client = app.test_client()
    client.get("/set/a/1")
    key = "session:" + sid_of(app, client)
    assert store.inner.hgetall(key)["\x00"] == b""
    with client.session_transaction() as sess:
        assert dict(sess) == {"a": "1"} and "\x00" not in sess
        with pytest.raises(ValueError, match="reserved"):
            sess["\x00"] = 1
    store.inner.hdel(key, "\x00")  # as an earlier version stored it
    store.calls.clear()
    client.get("/set/b/2")
    ttl = app.permanent_session_lifetime.total_seconds()
    assert store.calls == [("hset", key, {"\x00": b"", "b": b'"2"'}),
                           ("expire", key, ttl, "if_no_ttl")]  # it had a TTL: it existed
    assert "session:" + sid_of(app, client) == key
    assert stored(store, key) == {"a": b'"1"', "b": b'"2"'}
    store.calls.clear()
    client.get("/set/b/3")  # the mark is back: one command again
    assert store.calls == [("hset", key, {"\x00": b"", "b": b'"3"'})]


def test_a_key_left_with_only_the_mark_is_no_session(app: Flask, store: RecordingStore) -> None:
    """Two requests that loaded the session each removed one of its last two keys (one
    HDEL each): the mark alone is left. That is no session: a fresh one starts, and the
    key goes at that load."""
    client = app.test_client()
    client.get("/set/a/1")
    old = sid_of(app, client)
    key = "session:" + old
    store.inner.hdel(key, "a")
    assert store.inner.hgetall(key) == {"\x00": b""}
    assert client.get("/get/a").json == {"value": None}
    assert store.inner.hgetall(key) == {}
    client.get("/set/b/2")
    assert sid_of(app, client) != old


def test_concurrent_requests_changing_different_keys_both_survive(
        app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/base/0")
    cookie = cookie_of(client)
    iface = app.session_interface
    headers = {"Cookie": f"session={cookie}"}
    with app.test_request_context("/", headers=headers) as c1:
        s1 = iface.open_session(app, c1.request)
        with app.test_request_context("/", headers=headers) as c2:
            s2 = iface.open_session(app, c2.request)
            assert s1 is not None and s2 is not None
            assert s1["base"] == "0" and s2["base"] == "0"  # both loaded first
            s1["a"] = 1
            s2["b"] = 2
            iface.save_session(app, s1, Response())
            iface.save_session(app, s2, Response())
    with client.session_transaction() as sess:
        assert dict(sess) == {"base": "0", "a": 1, "b": 2}


@pytest.mark.parametrize("value", [
    "garbage", "", "abc.def", "x" * 3000, "..", "\x00\x01",
    "dGVzdA.ZmFrZXNpZ25hdHVyZQ",
])
def test_bad_cookie_is_a_fresh_session_without_lookup(app: Flask, store: RecordingStore,
                                                      value: str) -> None:
    client = app.test_client()
    client.set_cookie("session", value)
    r = client.get("/get/a")
    assert r.status_code == 200 and r.json == {"value": None}
    assert store.calls == []


def test_tampered_and_unsigned_cookies(app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    good = cookie_of(client)
    assert good is not None
    sid, sig = good.rsplit(".", 1)
    store.calls.clear()
    # (the signature's first character: its last one also holds base64 padding bits,
    # and changing only those leaves the same signature bytes)
    for bad in (sid, sid + "." + ("A" if sig[0] != "A" else "B") + sig[1:],
                sid[:-1] + ("x" if sid[-1] != "x" else "y") + "." + sig):
        other = app.test_client()
        other.set_cookie("session", bad)
        assert other.get("/get/a").json == {"value": None}
    assert store.calls == []
    # signed with another key: also rejected
    forged = sign(sid.split(".")[0], key="other-key")
    other = app.test_client()
    other.set_cookie("session", forged)
    r = other.get("/get/a")
    assert r.json == {"value": None}
    assert store.calls == []
    assert "Set-Cookie" not in r.headers  # a cookie we can't verify is left alone, as Flask does


def test_secret_key_rotation(app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    old_cookie = cookie_of(client)
    assert client.get("/get/a").json == {"value": "1"}  # the cookie is now known good
    # Rotate: the old key becomes a fallback. The session survives and the cookie is
    # re-signed with the new key (same id).
    app.secret_key = "new-secret"
    app.config["SECRET_KEY_FALLBACKS"] = ["test-secret"]
    r = client.get("/get/a")
    assert r.json == {"value": "1"}
    new_cookie = cookie_of(client)
    assert new_cookie != old_cookie
    assert new_cookie is not None and new_cookie.split(".")[0] == old_cookie.split(".")[0]
    assert client.get("/get/a").json == {"value": "1"}
    # Drop the old key: a cookie signed with it no longer opens the session, even though
    # this process verified that very value before.
    app.config["SECRET_KEY_FALLBACKS"] = []
    stale = app.test_client()
    stale.set_cookie("session", old_cookie)
    assert stale.get("/get/a").json == {"value": None}
    assert client.get("/get/a").json == {"value": "1"}


def test_regenerate(app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    client.get("/set/b/2")
    old = sid_of(app, client)
    client.get("/regenerate")
    new = sid_of(app, client)
    assert new != old
    assert stored(store, "session:" + old) == {}
    assert stored(store, "session:" + new) == {"a": b'"1"', "b": b'"2"'}
    assert client.get("/get/a").json == {"value": "1"}
    # the old cookie no longer opens anything
    stale = app.test_client()
    stale.set_cookie("session", sign(old))
    assert stale.get("/get/a").json == {"value": None}


def test_destroy(app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    sid = sid_of(app, client)
    r = client.get("/destroy")
    assert "session=;" in r.headers["Set-Cookie"]
    assert cookie_of(client) is None
    assert stored(store, "session:" + sid) == {}


def test_session_that_becomes_empty_is_deleted(app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    sid = sid_of(app, client)
    r = client.get("/del/a")
    assert "session=;" in r.headers["Set-Cookie"]
    assert stored(store, "session:" + sid) == {}


def test_size_limit(store: RecordingStore, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(store, SESSION_MAX_SIZE=10_000)
    client = app.test_client()
    with pytest.raises(SessionTooLarge):  # testing mode propagates
        client.get("/big")
    assert "session too large" in caplog.text
    app.testing = False
    assert client.get("/big").status_code == 500
    assert cookie_of(client) is None
    # grown by nested mutation: caught at save, nothing written
    app.testing = True
    client.get("/set/a/1")
    for _ in range(3):
        client.get("/append/" + "y" * 3000)
    with pytest.raises(SessionTooLarge):
        client.get("/append/" + "y" * 3000)
    with client.session_transaction() as sess:
        assert len(sess["items"]["list"]) == 3


def test_size_limit_handled_by_app(store: RecordingStore) -> None:
    app = make_app(store, SESSION_MAX_SIZE=10_000)

    @app.errorhandler(SessionTooLarge)
    def too_large(exc: SessionTooLarge) -> tuple[str, int]:
        return "too large", 413

    assert app.test_client().get("/big").status_code == 413


def test_cookie_config(store: RecordingStore) -> None:
    app = make_app(store, SESSION_COOKIE_SECURE=True, SESSION_COOKIE_NAME="sid",
                   SESSION_PERMANENT=False, SESSION_KEY_PREFIX="s:",
                   PERMANENT_SESSION_LIFETIME=timedelta(hours=1), SESSION_ID_LENGTH=16)
    client = app.test_client()
    r = client.get("/set/a/1")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("sid=") and "Secure" in cookie and "Expires" not in cookie
    iface = app.session_interface
    assert isinstance(iface, StoreSessionInterface)
    sid = iface.sid_from_cookie(app, client.get_cookie("sid").value)  # type: ignore[union-attr]
    assert sid is not None and len(sid) == 22
    ttl = store.inner.ttl("s:" + sid)
    assert ttl is not None and 3000 < ttl <= 3600  # non-permanent: the store still expires it
    with pytest.raises(ValueError):
        make_app(store, SESSION_ID_LENGTH=8)


def test_store_from_config(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", SESSION_URL="sqlite:///" + str(tmp_path / "c.db"))
    ext = Session()
    ext.init_app(app)
    assert ext.store is not None and ext.store.url.startswith("sqlite")
    app2 = Flask(__name__)
    app2.config.update(SECRET_KEY="k", SESSION_TYPE="memory")
    assert Session(app2).store is not None
    with pytest.raises(ValueError):
        Session(Flask(__name__))


def test_redis_client_config() -> None:
    import fakeredis

    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", SESSION_TYPE="redis",
                      SESSION_REDIS=fakeredis.FakeRedis())

    @app.get("/set")
    def set_() -> str:
        session["n"] = (1, 2)
        return "ok"

    @app.get("/get")
    def get() -> Response:
        return jsonify(n=session["n"], t=type(session["n"]).__name__)

    Session(app)
    client = app.test_client()
    client.get("/set")
    assert client.get("/get").json == {"n": [1, 2], "t": "tuple"}


def test_outage_503_only_for_session_routes(app: Flask, store: RecordingStore,
                                           caplog: pytest.LogCaptureFixture) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    store.down = True
    r = client.get("/get/a")
    assert r.status_code == 503
    assert r.json == {"error": "session store unavailable"}
    assert r.headers["Retry-After"] == "5"
    assert "session store unavailable" in caplog.text
    assert client.get("/plain").status_code == 200
    store.down = False
    assert client.get("/get/a").json == {"value": "1"}  # recovers by itself


def test_outage_while_saving(store: RecordingStore) -> None:
    app = make_app(store)

    @app.get("/flaky")
    def flaky() -> str:
        session["b"] = 2
        store.down = True  # loaded fine, the save fails
        return "ok"

    client = app.test_client()
    client.get("/set/a/1")
    r = client.get("/flaky")
    store.down = False
    assert r.status_code == 503 and r.json == {"error": "session store unavailable"}
    assert r.headers["Retry-After"] == "5"
    with client.session_transaction() as sess:
        assert dict(sess) == {"a": "1"}  # nothing half-written


def test_no_secret_key_gives_flask_null_session(store: RecordingStore) -> None:
    app = make_app(store)
    app.secret_key = None
    app.testing = False
    assert app.test_client().get("/set/a/1").status_code == 500
    assert app.test_client().get("/get/a").json == {"value": None}


def test_permanent_flag(store: RecordingStore) -> None:
    app = make_app(store, SESSION_PERMANENT=False)

    @app.get("/perm")
    def perm() -> str:
        session.permanent = True
        return "ok"

    client = app.test_client()
    assert "Expires" not in client.get("/set/a/1").headers["Set-Cookie"]
    assert "Expires" in client.get("/perm").headers["Set-Cookie"]
    with client.session_transaction() as sess:
        assert sess.permanent is True


def test_lazy_session_repr_and_sid(app: Flask) -> None:
    with app.test_request_context("/"):
        s = session._get_current_object()  # type: ignore[attr-defined]
        assert isinstance(s, ServerSession)
        assert s.accessed  # Flask sets it when the proxy is touched; loading is separate
        assert "not loaded" in repr(s) and not s._loaded
        assert s.sid and s.new and s._loaded and not s.modified


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=300))
def test_arbitrary_cookies_never_raise(app: Flask, store: RecordingStore, value: str) -> None:
    store.calls.clear()
    client = app.test_client()
    r = client.get("/get/a", environ_base={"HTTP_COOKIE": "session=" + value})
    assert r.status_code == 200 and r.json == {"value": None}
    assert store.calls == []
    iface = app.session_interface
    assert isinstance(iface, StoreSessionInterface)
    assert iface.sid_from_cookie(app, value) is None


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_arbitrary_stored_bytes_never_raise(app: Flask, store: RecordingStore, raw: bytes) -> None:
    # Whatever bytes a field holds in the store (another app, a bug, an attacker with
    # store access), loading never raises and never runs code: the field decodes as
    # JSON or tagged JSON, or it is dropped; the other fields are untouched.
    client = app.test_client()
    client.get("/set/a/1")
    sid = sid_of(app, client)
    store.inner.hset("session:" + sid, {"junk": raw})
    r = client.get("/get/a")
    assert r.status_code == 200 and r.json == {"value": "1"}
    assert client.get("/set/b/2").status_code == 200  # a save with the junk loaded
    fields = stored(store, "session:" + sid)
    assert fields["a"] == b'"1"' and fields["b"] == b'"2"'
    assert set(fields) <= {"a", "b", "junk", "_permanent"}


# -- Flask's behaviour ------------------------------------------------------------------------


class Clock:
    """``time.time`` moved forward on demand (the signer's timestamps and ours)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import time

        self.offset = 0.0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)

    def advance(self, seconds: float) -> None:
        self.offset += seconds


_OPS: dict[str, Any] = {
    "get": lambda s: s.get("a"),
    "getitem": lambda s: s["a"],
    "contains": lambda s: "a" in s,
    "iterate": lambda s: list(s),
    "len": len,
    "copy": lambda s: s.copy(),
    "or": lambda s: s | {"b": 2},
    "set same value": lambda s: s.__setitem__("a", "1"),
    "set": lambda s: s.__setitem__("b", 2),
    "setdefault existing": lambda s: s.setdefault("a", "x"),
    "setdefault missing": lambda s: s.setdefault("z", "x"),
    "pop existing": lambda s: s.pop("a"),
    "pop missing": lambda s: s.pop("nope", None),
    "popitem": lambda s: s.popitem(),
    "del": lambda s: s.__delitem__("a"),
    "clear": lambda s: s.clear(),
    "update": lambda s: s.update(b=2),
    "update nothing": lambda s: s.update(),
    "ior": lambda s: s.__ior__({"b": 2}),
    "permanent = True": lambda s: setattr(s, "permanent", True),
    "read permanent": lambda s: s.permanent,
}


@pytest.mark.parametrize("op", sorted(_OPS))
def test_modified_follows_flasks_cookie_session(app: Flask, op: str) -> None:
    """Each operation sets ``modified`` exactly when it does on Flask's own session
    (and returns the same thing)."""
    from flask.sessions import SecureCookieSession

    client = app.test_client()
    client.get("/set/a/1")
    reference = SecureCookieSession({"a": "1"})
    expected = _OPS[op](reference)
    with app.test_request_context("/", headers={"Cookie": f"session={cookie_of(client)}"}):
        ours = app.session_interface.open_session(app, flask_request())
        assert isinstance(ours, ServerSession) and not ours.modified
        got = _OPS[op](ours)
        assert ours.modified is reference.modified
        if op == "ior":
            assert got is ours
        elif op != "read permanent":  # SESSION_PERMANENT defaults to True here
            assert got == expected and type(got) is type(expected)
        assert dict(ours) == dict(reference)


def flask_request() -> Any:
    from flask import request

    return request._get_current_object()  # type: ignore[attr-defined]


def test_accessed_and_vary_follow_flask(store: RecordingStore) -> None:
    from flask.globals import request_ctx

    app = make_app(store, SESSION_PERMANENT=False)  # (a permanent one is re-sent: below)
    client = app.test_client()
    client.get("/set/a/1")
    with client:
        r = client.get("/plain")
        assert "Cookie" not in r.vary and not request_ctx._session.accessed
    with client:
        r = client.get("/get/a")
        assert "Cookie" in r.vary and request_ctx._session.accessed
        assert not request_ctx._session.modified


def test_unverifiable_cookie_is_left_alone_through_a_rotation(app: Flask,
                                                              store: RecordingStore) -> None:
    """Flask's test_session_secret_key_fallbacks, on the store: one request on a host
    with the wrong key must not cost the user their session."""
    client = app.test_client()
    client.get("/set/a/1")
    store.calls.clear()
    app.secret_key = "wrong-key"
    for path in ("/get/a", "/plain", "/del/a"):
        r = client.get(path)
        assert "Set-Cookie" not in r.headers, path
    assert client.get("/get/a").json == {"value": None}
    assert store.calls == []  # never looked up, never deleted
    app.secret_key = "newest-key"
    app.config["SECRET_KEY_FALLBACKS"] = ["test-secret"]
    assert client.get("/get/a").json == {"value": "1"}


def test_samesite(store: RecordingStore) -> None:
    app = make_app(store)
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"  # Flask's None, made secure
    client = app.test_client()
    assert "SameSite=Lax" in client.get("/set/a/1").headers["Set-Cookie"]
    app.config["SESSION_COOKIE_SAMESITE"] = None  # as in Flask: no attribute
    assert "samesite" not in client.get("/set/a/2").headers["Set-Cookie"].lower()
    app.config["SESSION_COOKIE_SAMESITE"] = "None"
    assert "SameSite=None" in client.get("/set/a/3").headers["Set-Cookie"]
    app.config["SESSION_COOKIE_SAMESITE"] = "invalid"
    with pytest.raises(ValueError):  # Flask (Werkzeug) rejects it when setting the cookie
        client.get("/set/a/4")
    assert "SameSite=Strict" in make_app(store, SESSION_COOKIE_SAMESITE="Strict").test_client(
        ).get("/set/a/1").headers["Set-Cookie"]
    with pytest.raises(ValueError, match="SESSION_COOKIE_SAMESITE"):
        make_app(store, SESSION_COOKIE_SAMESITE="sometimes")


def test_subclass_hooks_are_obeyed(store: RecordingStore) -> None:
    """save_session asks the interface's hooks (Flask's), so overriding one works."""
    fixed = datetime(2031, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    class Custom(StoreSessionInterface):
        def get_cookie_name(self, app: Flask) -> str:
            return "custom"

        def get_cookie_partitioned(self, app: Flask) -> bool:
            return True

        def get_cookie_samesite(self, app: Flask) -> str | None:
            return "Strict"

        def get_expiration_time(self, app: Flask, session: Any) -> datetime | None:
            return fixed

        def should_set_cookie(self, app: Flask, session: Any) -> bool:
            return bool(session.get("send", True))

    app = make_app(store)
    app.session_interface = iface = Custom(store)

    @app.get("/quiet")
    def quiet() -> str:
        session["send"] = False
        return "ok"

    client = app.test_client()
    r = client.get("/set/a/1")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("custom=")
    for part in ("Partitioned", "Secure", "SameSite=Strict",
                 "Expires=Thu, 02 Jan 2031 03:04:05 GMT"):
        assert part in cookie, part
    client.get("/quiet")
    r = client.get("/set/b/2")
    assert "Set-Cookie" not in r.headers  # saved, but the hook said no cookie
    sid = iface.sid_from_cookie(app, client.get_cookie("custom").value)  # type: ignore[union-attr]
    assert sid is not None and stored(store, "session:" + sid)["b"] == b'"2"'


def test_outage_503_keeps_other_extensions_headers(store: RecordingStore) -> None:
    app = make_app(store)

    @app.after_request
    def security_headers(response: Response) -> Response:  # what CORS/Talisman-style code does
        response.headers["Access-Control-Allow-Origin"] = "https://app.example"
        response.headers["Strict-Transport-Security"] = "max-age=63072000"
        response.headers["Content-Security-Policy"] = "default-src 'self'"
        response.set_cookie("csrf", "token")
        return response

    @app.get("/cached")
    def cached() -> Response:
        session["b"] = 2
        store.down = True  # loaded fine, the save fails
        r = Response("<p>hi</p>", mimetype="text/html")
        r.headers["Cache-Control"] = "public, max-age=600"
        r.headers["ETag"] = '"abc"'
        return r

    client = app.test_client()
    client.get("/set/a/1")
    for path in ("/cached", "/get/a"):  # failing at save, and at load (in the view)
        store.down = path == "/get/a"
        r = client.get(path)
        store.down = False
        assert r.status_code == 503 and r.json == {"error": "session store unavailable"}
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert r.headers["Strict-Transport-Security"] == "max-age=63072000"
        assert r.headers["Content-Security-Policy"] == "default-src 'self'"
        assert any(c.startswith("csrf=token") for c in r.headers.getlist("Set-Cookie"))
        assert r.headers["Cache-Control"] == "no-store" and "ETag" not in r.headers
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Retry-After"] == "5" and "Cookie" in r.vary
        assert int(r.headers["Content-Length"]) == len(r.data)


# -- sliding expiry ---------------------------------------------------------------------------


def test_untouched_requests_refresh_cookie_and_ttl_once_per_interval(
        app: Flask, store: RecordingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    client, key, ttl, first = stored_session(app, store)
    for _ in range(5):  # within the interval (60 s): the cookie is re-sent, no store access
        r = client.get("/plain")
        assert "Expires=" in r.headers["Set-Cookie"] and "Cookie" in r.vary
        assert cookie_of(client) == first
    assert store.calls == []
    clock.advance(61)
    client.get("/plain")  # due: one EXPIRE, and the cookie says when
    assert store.calls == [("expire", key, ttl)]
    second = cookie_of(client)
    assert second != first and sid_of(app, client) == key.split(":", 1)[1]
    store.calls.clear()
    client.get("/plain")
    assert store.calls == [] and cookie_of(client) == second
    clock.advance(61)
    assert client.get("/get/a").json == {"value": "1"}  # due while loading: same round trip
    assert store.calls == [("batch", [("hgetall", key), ("expire", key, ttl)])]
    left = store.inner.ttl(key)
    assert left is not None and left > ttl - 30


@pytest.mark.parametrize("config", [{"SESSION_PERMANENT": False},
                                    {"SESSION_REFRESH_EACH_REQUEST": False}])
def test_no_refresh_where_flask_does_none(store: RecordingStore, monkeypatch: pytest.MonkeyPatch,
                                         config: dict[str, Any]) -> None:
    """A non-permanent session, or SESSION_REFRESH_EACH_REQUEST=False: as in Flask, the
    lifetime runs from the last modification; untouched requests send nothing."""
    clock = Clock(monkeypatch)
    app = make_app(store, **config)
    client = app.test_client()
    client.get("/set/a/1")
    store.calls.clear()
    clock.advance(3600)
    assert "Set-Cookie" not in client.get("/plain").headers
    assert client.get("/get/a").json == {"value": "1"}
    assert store.calls == [("hgetall", "session:" + sid_of(app, client))]


@pytest.mark.parametrize("config", [{"SESSION_PERMANENT": False},
                                    {"SESSION_REFRESH_EACH_REQUEST": False}, {}])
def test_writes_set_the_ttl_again_at_most_once_per_interval(
        store: RecordingStore, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any]) -> None:
    """Every session's TTL is set again at most once per SESSION_REFRESH_INTERVAL (60 s
    here) by writes, permanent or not: within it a read-modify-write is one plain HSET
    and the cookie is re-sent as it was; once it has passed, the write sets the TTL
    too and the cookie is signed again (it says when). A session Flask doesn't refresh
    on each request never slides on reads."""
    clock = Clock(monkeypatch)
    app = make_app(store, **config)
    sliding = not config  # permanent, refreshed on each request
    client, key, ttl, first = stored_session(app, store)
    for i in range(3):
        clock.advance(10)
        r = client.get(f"/rmw/a/{i}")
        assert "Set-Cookie" in r.headers and cookie_of(client) == first
    assert store.calls == [("hgetall", key), ("hset", key, {"a": b'"0"'})] + [
        ("hgetall", key), ("hset", key, {"a": b'"1"'}),
        ("hgetall", key), ("hset", key, {"a": b'"2"'})]
    clock.advance(31)  # 61 s since the cookie was signed: due
    store.calls.clear()
    client.get("/rmw/a/3")
    if sliding:  # the refresh rides with the load
        assert store.calls == [("batch", [("hgetall", key), ("expire", key, ttl)]),
                               ("hset", key, {"a": b'"3"'})]
    else:
        assert store.calls == [("hgetall", key),
                               ("batch", [("hset", key, {"a": b'"3"'}), ("expire", key, ttl)])]
    second = cookie_of(client)
    assert second != first and sid_of(app, client) == key.split(":", 1)[1]
    store.calls.clear()
    client.get("/set/a/4")  # a write without a read, within the new interval: no refresh
    assert store.calls == [("hset", key, {"\x00": b"", "a": b'"4"'})]
    assert cookie_of(client) == second
    clock.advance(61)
    store.calls.clear()
    client.get("/set/a/5")  # due: the refresh goes first, in the same round trip
    assert store.calls == [("batch", [("expire", key, ttl),
                                      ("hset", key, {"\x00": b"", "a": b'"5"'}),
                                      ("expire", key, ttl, "if_no_ttl")])]
    third = cookie_of(client)
    assert third != second
    clock.advance(61)
    store.calls.clear()
    r = client.get("/get/a")  # a read: only a sliding session is refreshed
    assert r.json == {"value": "5"}
    if sliding:
        assert store.calls == [("batch", [("hgetall", key), ("expire", key, ttl)])]
        assert cookie_of(client) != third
    else:
        assert store.calls == [("hgetall", key)]
        assert "Set-Cookie" not in r.headers and cookie_of(client) == third
    left = store.inner.ttl(key)  # (SQLite's clock is the one moved; memory's is not)
    assert left is not None and left > ttl - (30 if sliding else 90)


def test_a_key_gone_between_load_and_save_gets_its_ttl_back(
        app: Flask, store: RecordingStore) -> None:
    """The session vanished (expired, deleted) between its load and its save: the
    HSET reply counts more fields created than the load lacked, and a second round
    trip gives the key made again its TTL (never a key without one)."""
    @app.get("/rmw-gone")
    def rmw_gone() -> str:
        session["a"] = session.get("a", "") + "+"
        store.inner.delete(key)  # meanwhile, elsewhere
        return "ok"

    client = app.test_client()
    client.get("/set/a/1")
    client.get("/set/b/2")
    key = "session:" + sid_of(app, client)
    ttl = app.permanent_session_lifetime.total_seconds()
    store.calls.clear()
    client.get("/rmw-gone")
    assert store.calls == [("hgetall", key), ("hset", key, {"a": b'"1+"'}),
                           ("expire", key, ttl, "if_no_ttl")]
    assert stored(store, key) == {"a": b'"1+"'}
    left = store.inner.ttl(key)
    assert left is not None and left > ttl - 30


def test_refresh_interval_zero_is_every_request(store: RecordingStore) -> None:
    app = make_app(store, SESSION_REFRESH_INTERVAL=0)
    client = app.test_client()
    client.get("/set/a/1")
    store.calls.clear()
    for _ in range(3):
        client.get("/plain")
    assert [c[0] for c in store.calls] == ["expire"] * 3
    for bad in (-1, "soon", float("nan")):
        with pytest.raises(ValueError, match="SESSION_REFRESH_INTERVAL"):
            make_app(store, SESSION_REFRESH_INTERVAL=bad)


def test_refresh_of_an_untouched_request_never_fails_it(
        app: Flask, store: RecordingStore, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(monkeypatch)
    client = app.test_client()
    client.get("/set/a/1")
    before = cookie_of(client)
    clock.advance(61)
    store.down = True
    r = client.get("/plain")
    assert r.status_code == 200 and "Set-Cookie" not in r.headers
    assert "expiry not refreshed" in caplog.text
    store.down = False
    store.calls.clear()
    client.get("/plain")
    assert [c[0] for c in store.calls] == ["expire"] and cookie_of(client) != before


def test_a_gone_session_costs_no_more_lookups(app: Flask, store: RecordingStore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    client = app.test_client()
    client.get("/set/a/1")
    cookie = cookie_of(client)
    store.inner.delete("session:" + sid_of(app, client))  # expired, or deleted elsewhere
    clock.advance(61)
    store.calls.clear()
    r = client.get("/plain")
    assert [c[0] for c in store.calls] == ["expire"]  # found out once...
    assert "Set-Cookie" not in r.headers and cookie_of(client) == cookie  # ...cookie left
    store.calls.clear()
    clock.advance(61)
    client.get("/plain")
    assert client.get("/get/a").json == {"value": None}
    assert store.calls == []  # ...and remembered
    client.get("/set/a/2")
    assert sid_of(app, client) != app.session_interface.sid_from_cookie(app, cookie)  # type: ignore[attr-defined]


# -- switching from Flask-Session -------------------------------------------------------------


def test_interface_regenerate_like_flask_session(app: Flask, store: RecordingStore) -> None:
    @app.get("/login")
    def login() -> str:
        app.session_interface.regenerate(session)  # type: ignore[attr-defined]
        session["user"] = "ann"
        return "ok"

    client = app.test_client()
    client.get("/set/a/1")
    old = sid_of(app, client)
    client.get("/login")
    new = sid_of(app, client)
    assert new != old and stored(store, "session:" + old) == {}
    assert stored(store, "session:" + new) == {"a": b'"1"', "user": b'"ann"'}


@pytest.mark.parametrize("kind", ["filesystem", "cachelib", "memcached", "mongodb",
                                  "sqlalchemy", "dynamodb", "null"])
def test_unsupported_session_type_says_what_to_use(kind: str) -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", SESSION_TYPE=kind)
    with pytest.raises(ValueError, match='SESSION_URL="sqlite:////') as info:
        Session(app)
    assert 'SESSION_URL="redis://' in str(info.value)


def test_flask_session_keys_without_meaning_get_one_warning() -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", SESSION_TYPE="memory", SESSION_USE_SIGNER=True,
                      SESSION_SERIALIZATION_FORMAT="json", SESSION_FILE_DIR="/tmp/x",
                      SESSION_CLEANUP_N_REQUESTS=100, SESSION_PROTECTION="strong")
    with pytest.warns(UserWarning) as seen:
        Session(app)
    assert len(seen) == 1
    text = str(seen[0].message)
    for key in ("SESSION_USE_SIGNER", "SESSION_SERIALIZATION_FORMAT", "SESSION_FILE_DIR",
                "SESSION_CLEANUP_N_REQUESTS"):
        assert key in text
    assert "SESSION_PROTECTION" not in text  # Flask-Login's, not ours to judge
    import warnings

    clean = Flask(__name__)
    clean.config.update(SECRET_KEY="k", SESSION_TYPE="memory")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Session(clean)


def test_cookie_of_the_previous_format_is_a_new_session_left_alone(
        app: Flask, store: RecordingStore) -> None:
    """Cookies from before the timestamped format (id.signature) verify no more: the
    user gets a new session (signs in again once); the old cookie is not deleted."""
    from itsdangerous import Signer

    client = app.test_client()
    client.get("/set/a/1")
    old = Signer("test-secret", salt=SALT).sign(sid_of(app, client)).decode()
    other = app.test_client()
    other.set_cookie("session", old)
    store.calls.clear()
    r = other.get("/get/a")
    assert r.json == {"value": None} and "Set-Cookie" not in r.headers
    assert store.calls == []


def test_cookie_expiry_formatted_as_werkzeug_does_once_per_second() -> None:
    from werkzeug.http import http_date

    from gunicorn_ext.state.flask import _http_date

    t = datetime(2031, 1, 2, 3, 4, 5, 250_000, tzinfo=timezone.utc)
    assert _http_date(t) == http_date(t) == "Thu, 02 Jan 2031 03:04:05 GMT"
    assert _http_date(t + timedelta(microseconds=500_000)) == http_date(t)  # the same second
    later = t + timedelta(seconds=1)
    assert _http_date(later) == http_date(later) != http_date(t)
    other = datetime(2031, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))  # same text?
    assert _http_date(other) == http_date(other) == "Thu, 02 Jan 2031 01:04:05 GMT"
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)  # a subclass's "expired": not cached yet
    assert _http_date(epoch) == http_date(epoch) == "Thu, 01 Jan 1970 00:00:00 GMT"
    before = epoch - timedelta(microseconds=500_000)  # a second apart from the epoch's text
    assert _http_date(before) == http_date(before) == "Wed, 31 Dec 1969 23:59:59 GMT"
    naive = datetime(2031, 1, 2, 3, 4, 5)
    assert _http_date(naive) is naive and _http_date(None) is None and _http_date(7) == 7
