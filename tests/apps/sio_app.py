"""Test app: Flask-SocketIO on several workers, sharing clients through the bus."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, jsonify
from flask_socketio import SocketIO, emit

from gunicorn_ext import worker
from gunicorn_ext.socketio import BusManager

app = Flask(__name__)
socketio = SocketIO(app, async_mode="threading", client_manager=BusManager())


@app.get("/healthz")
def healthz() -> Any:
    return "ok"


@app.get("/whoami")
def whoami() -> Any:
    return jsonify(pid=os.getpid(), slot=worker.slot)


@socketio.on("where", namespace="/chat")
def where() -> dict[str, int]:
    """Acknowledged with this worker's slot and pid."""
    return {"slot": worker.slot, "pid": os.getpid()}


@socketio.on("say", namespace="/chat")
def say(data: Any) -> None:
    emit("said", data, broadcast=True)
