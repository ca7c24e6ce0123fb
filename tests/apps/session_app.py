"""Test app for sessions across real Gunicorn workers: ours or Flask-Session 0.8."""

from __future__ import annotations

import os
import time

import redis
from flask import Flask, jsonify, request, session

IMPL = os.environ.get("SESSION_IMPL", "ours")
STATE_URL = os.environ["STATE_URL"]

app = Flask(__name__)
app.secret_key = "test-secret-key"
if os.environ.get("SESSION_LIFETIME"):
    app.config["PERMANENT_SESSION_LIFETIME"] = int(os.environ["SESSION_LIFETIME"])

if IMPL == "ours":
    from gunicorn_ext.state.flask import Session

    app.config["SESSION_URL"] = STATE_URL
    if os.environ.get("SESSION_REFRESH_INTERVAL"):
        app.config["SESSION_REFRESH_INTERVAL"] = float(os.environ["SESSION_REFRESH_INTERVAL"])
    Session(app)
else:
    from flask_session import Session as FlaskSession

    app.config["SESSION_TYPE"] = "redis"
    app.config["SESSION_REDIS"] = redis.Redis.from_url(STATE_URL)
    FlaskSession(app)


@app.get("/healthz")
def healthz() -> str:
    return "ok"


@app.get("/set/<key>")
def set_key(key: str):  # type: ignore[no-untyped-def]
    """Read the session, wait (so two requests overlap), then change one key."""
    _ = dict(session)
    time.sleep(float(request.args.get("sleep", "0")))
    session[key] = request.args.get("v", "1")
    return jsonify(ok=True, pid=os.getpid())


@app.get("/put/<key>")
def put_key(key: str):  # type: ignore[no-untyped-def]
    """Change one key without reading the session first."""
    session[key] = request.args.get("v", "1")
    return jsonify(ok=True)


@app.get("/get")
def get_all():  # type: ignore[no-untyped-def]
    return jsonify(dict(session))


@app.get("/nosession")
def nosession() -> str:
    return "no session needed"
