"""The example app: the acceptance surface of gunicorn-ext (see MISSION.md, section 5)."""

from __future__ import annotations

import collections
import os
import threading

from flask import Flask, Response, jsonify, request

import gunicorn_ext
from gunicorn_ext import worker

app = Flask(__name__)
INSTANCE = os.environ.get("INSTANCE", "local")

# Messages this worker received by broadcast, newest last (bounded).
_inbox: collections.deque[object] = collections.deque(maxlen=1000)
_inbox_lock = threading.Lock()


@worker.handler("broadcast")
def _on_broadcast(msg: gunicorn_ext.Message) -> None:
    with _inbox_lock:
        _inbox.append(msg.payload)


@app.get("/healthz")
def healthz() -> tuple[str, int, dict[str, str]]:
    return "ok", 200, {"Content-Type": "text/plain"}


@app.get("/whoami")
def whoami():  # type: ignore[no-untyped-def]
    return jsonify(pid=os.getpid(), slot=worker.slot, instance=INSTANCE)


@app.get("/cluster")
def cluster():  # type: ignore[no-untyped-def]
    try:
        info = worker.request("gunicorn_ext.cluster", timeout=2.0)
    except gunicorn_ext.IPCError as exc:
        return jsonify(error=str(exc)), 503
    return jsonify(info)


@app.post("/broadcast")
def broadcast():  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "message" not in body:
        return jsonify(error='expected a JSON object {"message": ...}'), 400
    try:
        worker.broadcast("broadcast", body["message"])
    except gunicorn_ext.IPCError as exc:
        return jsonify(error=str(exc)), 503
    return jsonify(sent=True, slot=worker.slot), 202


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
