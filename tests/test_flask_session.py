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

    def expire(self, key: str, ttl: float) -> Batch:
        return self._add("expire", key, ttl)

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

    def expire(self, key: str, ttl: float) -> bool:
        return self._do("expire", key, ttl)  # type: ignore[no-any-return]

    def ttl(self, key: str) -> float | None:
        return self._do("ttl", key)  # type: ignore[no-any-return]

    def hgetall(self, key: str) -> dict[str, bytes]:
        return self._do("hgetall", key)  # type: ignore[no-any-return]

    def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        self._do("hset", key, mapping)

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


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordingStore]:
    url = "memory://" if request.param == "memory" else "sqlite:///" + str(tmp_path / "s.db")
    inner = open_store(url)
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


def sid_of(app: Flask, client: Any) -> str:
    iface = app.session_interface
    assert isinstance(iface, StoreSessionInterface)
    sid = iface.sid_from_cookie(app, cookie_of(client))
    assert sid is not None
    return sid


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
    assert store.inner.hgetall("session:" + sid) == {"a": b'"1"'}
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
    for raw in store.inner.hgetall("session:" + sid_of(app, client)).values():
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
    store.calls.clear()
    client.get("/set/b/3")
    ttl = app.permanent_session_lifetime.total_seconds()
    assert store.calls == [
        ("batch", [("hgetall", key), ("expire", key, ttl)]),
        ("batch", [("hset", key, {"b": b'"3"'}), ("expire", key, ttl)]),
    ]
    store.calls.clear()
    client.get("/set/b/3")  # same value: nothing to write
    assert store.calls == [("batch", [("hgetall", key), ("expire", key, ttl)])]
    store.calls.clear()
    client.get("/del/a")
    assert store.calls[1] == ("batch", [("hdel", key, "a"), ("expire", key, ttl)])
    assert store.inner.hgetall(key) == {"b": b'"3"'}
    store.calls.clear()
    client.get("/plain")  # never touched: no store access at all
    assert store.calls == []


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
    from itsdangerous import Signer
    forged = Signer("other-key", salt=SALT).sign(sid).decode()
    other = app.test_client()
    other.set_cookie("session", forged)
    r = other.get("/get/a")
    assert r.json == {"value": None}
    assert store.calls == []
    assert "session=;" in r.headers["Set-Cookie"]  # a bad cookie on an empty session goes


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
    assert new_cookie is not None and new_cookie.rsplit(".", 1)[0] == old_cookie.rsplit(".", 1)[0]
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
    assert store.inner.hgetall("session:" + old) == {}
    assert store.inner.hgetall("session:" + new) == {"a": b'"1"', "b": b'"2"'}
    assert client.get("/get/a").json == {"value": "1"}
    # the old cookie no longer opens anything
    stale = app.test_client()
    from itsdangerous import Signer
    stale.set_cookie("session", Signer("test-secret", salt=SALT).sign(old).decode())
    assert stale.get("/get/a").json == {"value": None}


def test_destroy(app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    sid = sid_of(app, client)
    r = client.get("/destroy")
    assert "session=;" in r.headers["Set-Cookie"]
    assert cookie_of(client) is None
    assert store.inner.hgetall("session:" + sid) == {}


def test_session_that_becomes_empty_is_deleted(app: Flask, store: RecordingStore) -> None:
    client = app.test_client()
    client.get("/set/a/1")
    sid = sid_of(app, client)
    r = client.get("/del/a")
    assert "session=;" in r.headers["Set-Cookie"]
    assert store.inner.hgetall("session:" + sid) == {}


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
    fakeredis = pytest.importorskip("fakeredis")
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
        assert "not loaded" in repr(s) and not s.accessed
        assert s.sid and s.new and s.accessed


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
    stored = store.inner.hgetall("session:" + sid)
    assert stored["a"] == b'"1"' and stored["b"] == b'"2"'
    assert set(stored) <= {"a", "b", "junk", "_permanent"}
