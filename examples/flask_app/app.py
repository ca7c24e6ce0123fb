"""The example app: the acceptance surface of gunicorn-ext (see MISSION.md, section 5)."""

from __future__ import annotations

import collections
import json
import os
import threading
from typing import Any, NoReturn

import chat
from flask import Flask, Response, abort, jsonify, request, session
from werkzeug.exceptions import RequestEntityTooLarge

import gunicorn_ext
from gunicorn_ext import worker
from gunicorn_ext.state import open_store
from gunicorn_ext.state.flask import Session
from gunicorn_ext.state.primitives import Counter

app = Flask(__name__)
# Bad input is the client's error, never a 500: a body over this is a 413 (Flask's own
# limit, on every route); JSON is parsed within bounds by json_body() below.
app.config["MAX_CONTENT_LENGTH"] = 8 * 1024 * 1024
MAX_JSON_DEPTH = 32
INSTANCE = os.environ.get("INSTANCE", "local")
# Shared state: an SQLite file by default (one machine, no server needed); a redis://
# URL to share it between machines. cluster_conf.py sets both from the environment.
app.secret_key = os.environ.get("SECRET_KEY") or "dev-only-secret-change-me"
app.config["SESSION_URL"] = os.environ.get("STATE_URL", "sqlite:///gunicorn-ext-state.db")
store = open_store(app.config["SESSION_URL"])
Session(app, store=store)
hits = Counter(store, "example:hits")
# Real time: a WebSocket chat at /ws and the Socket.IO namespace /chat, fanned out to
# every worker over the bus, or over Redis (all instances) when STATE_URL is redis://.
socketio = chat.init_app(app, instance=INSTANCE, state_url=app.config["SESSION_URL"]).socketio

# Messages this worker received by broadcast, newest last (bounded).
_inbox: collections.deque[object] = collections.deque(maxlen=1000)
_inbox_lock = threading.Lock()
#: POST /broadcast publishes on this bus topic, to which every worker subscribes: a
#: publication crosses instances over the bus bridge (a worker.broadcast would not).
BROADCAST_TOPIC = "example:broadcast"


@worker.subscribe(BROADCAST_TOPIC)
def _on_broadcast(msg: gunicorn_ext.Message) -> None:
    with _inbox_lock:
        _inbox.append(msg.payload)


def _client_error(status: int, error: str) -> NoReturn:
    response = jsonify(error=error)
    response.status_code = status
    abort(response)


def json_body() -> Any:
    """The request's JSON body, parsed within bounds.

    Over MAX_CONTENT_LENGTH: 413; not JSON, or nested deeper than MAX_JSON_DEPTH: 400.
    (Flask's get_json(silent=True) would let a RecursionError through as a 500.)
    """
    try:
        data = request.get_data(cache=False)
    except RequestEntityTooLarge:
        limit = app.config["MAX_CONTENT_LENGTH"]
        _client_error(413, f"request body is over {limit >> 20} MiB")
    try:
        value = json.loads(data)
    except RecursionError:
        _client_error(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    except ValueError as exc:  # malformed, not UTF-8, an int of too many digits
        _client_error(400, f"body is not valid JSON: {exc}")
    if _deeper_than(value, MAX_JSON_DEPTH):
        _client_error(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


@app.get("/healthz")
def healthz() -> tuple[str, int, dict[str, str]]:
    return "ok", 200, {"Content-Type": "text/plain"}


@app.get("/whoami")
def whoami():  # type: ignore[no-untyped-def]
    return jsonify(pid=os.getpid(), slot=worker.slot, instance=INSTANCE)


@app.get("/counter")
def counter():  # type: ignore[no-untyped-def]
    """A per-session counter: the same count whichever worker answers."""
    session["count"] = session.get("count", 0) + 1
    return jsonify(count=session["count"], pid=os.getpid(), slot=worker.slot)


@app.get("/hits")
def all_hits():  # type: ignore[no-untyped-def]
    """A cluster-wide counter in shared state (atomic on every backend)."""
    return jsonify(hits=hits.incr())


@app.get("/cluster")
def cluster():  # type: ignore[no-untyped-def]
    try:
        info = worker.request("gunicorn_ext.cluster", timeout=2.0)
    except gunicorn_ext.IPCError as exc:
        return jsonify(error=str(exc)), 503
    return jsonify(info)


@app.post("/broadcast")
def broadcast():  # type: ignore[no-untyped-def]
    body = json_body()
    if not isinstance(body, dict) or "message" not in body:
        return jsonify(error='expected a JSON object {"message": ...}'), 400
    try:
        worker.publish(BROADCAST_TOPIC, body["message"])
        # Asked after the publication (the bus keeps their order): did it leave the instance?
        bridge = worker.request("gunicorn_ext.bridge", timeout=2.0)
    except gunicorn_ext.MessageTooLarge as exc:  # refused before sending: the bus is fine
        return jsonify(error=str(exc), slot=worker.slot), 413
    except gunicorn_ext.UnencodableMessage as exc:  # an int beyond 64 bits, ...
        return jsonify(error=str(exc), slot=worker.slot), 400
    except gunicorn_ext.IPCError as exc:
        return jsonify(error=str(exc), slot=worker.slot), 503
    if bridge["on"] and not bridge["up"]:
        return jsonify(error=f"the bus bridge is down ({bridge['down_reason']}): delivered "
                       "on this instance only", delivered="instance", slot=worker.slot), 503
    return jsonify(sent=True, slot=worker.slot,
                   delivered="cluster" if bridge["on"] else "instance"), 202


@app.get("/inbox")
def inbox():  # type: ignore[no-untyped-def]
    with _inbox_lock:
        messages = list(_inbox)
    return jsonify(slot=worker.slot, pid=os.getpid(), messages=messages)


@app.get("/metrics")
def metrics():  # type: ignore[no-untyped-def]
    """Prometheus text for the whole instance, gathered by the primary over the bus."""
    try:
        text = worker.request("gunicorn_ext.metrics", timeout=5.0)
    except gunicorn_ext.IPCError as exc:
        return Response(f"# metrics unavailable: {exc}\n", 503, mimetype="text/plain")
    return Response(text, mimetype="text/plain; version=0.0.4; charset=utf-8")
