"""Flask app for bench/sessions.py: the same endpoints on three session backends:
``/write`` (read-modify-write), ``/read`` (read only), ``/set`` (a write that doesn't read).

SESSION_IMPL picks the backend: "ours" (gunicorn_ext.state.flask on REDIS_URL), "flask_session"
(Flask-Session 0.8, SESSION_TYPE=redis on the same Redis) or "cookie" (Flask's
signed-cookie session).
"""

from __future__ import annotations

import itertools
import os

import redis
from flask import Flask, session

IMPL = os.environ.get("SESSION_IMPL", "ours")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Flask(__name__)
app.secret_key = "bench-secret-key-not-for-production"

if IMPL == "ours":
    from gunicorn_ext.state.flask import Session

    app.config["SESSION_URL"] = REDIS_URL
    Session(app)
elif IMPL == "flask_session":
    from flask_session import Session as FlaskSession

    app.config["SESSION_TYPE"] = "redis"
    app.config["SESSION_REDIS"] = redis.Redis.from_url(REDIS_URL)
    FlaskSession(app)


@app.get("/healthz")
def healthz() -> str:
    return "ok"


@app.get("/none")
def none() -> str:
    """The same request without a session: the floor under any session."""
    return "1"


_floor_key = "bench:floor"
# redis-py's cheapest path: a client holding one connection (a sync worker has one thread)
_floor_redis = redis.Redis.from_url(REDIS_URL).client()
_floor_fields = {"n": b"1", "user": b'{"name":"ada","roles":["admin"]}'}


@app.get("/roundtrip")
def roundtrip() -> str:
    """``/none`` plus one redis-py HGETALL of a session-sized hash (what a load costs)."""
    if not _floor_redis.hgetall(_floor_key):
        _floor_redis.hset(_floor_key, mapping=_floor_fields)
    return "1"


@app.get("/roundtrip2")
def roundtrip2() -> str:
    """``/roundtrip`` plus one HSET of a field of it: the two round trips of a
    read-modify-write (the load, then the save)."""
    _floor_redis.hgetall(_floor_key)
    _floor_redis.hset(_floor_key, mapping=_floor_fields)
    return "1"


@app.get("/write")
def write() -> str:
    session["n"] = session.get("n", 0) + 1
    session["user"] = {"name": "ada", "roles": ["admin"]}
    return str(session["n"])


@app.get("/read")
def read() -> str:
    return str(session.get("n"))


_ticks = itertools.count()


@app.get("/set")
def set_only() -> str:
    """A write that doesn't read the session first (a new value every time)."""
    session["tick"] = next(_ticks)
    return "ok"
