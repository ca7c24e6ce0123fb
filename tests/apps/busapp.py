"""Test app: exposes the worker bus API over HTTP so tests can drive it."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import gunicorn_ext
from gunicorn_ext import worker

_lock = threading.Lock()
_inbox: list[dict[str, Any]] = []
_errors: list[dict[str, Any]] = []


def _record(kind: str, msg: gunicorn_ext.Message) -> None:
    with _lock:
        _inbox.append({"kind": kind, "name": msg.name, "payload": msg.payload, "src": msg.src})


@worker.handler("echo")
def echo(msg: gunicorn_ext.Message) -> dict[str, Any]:
    return {"slot": worker.slot, "pid": os.getpid(), "payload": msg.payload, "src": msg.src}


@worker.handler("note")
def note(msg: gunicorn_ext.Message) -> None:
    _record("note", msg)


@worker.handler("inbox")
def inbox(msg: gunicorn_ext.Message) -> list[dict[str, Any]]:
    with _lock:
        return list(_inbox)


@worker.handler("boom")
def boom(msg: gunicorn_ext.Message) -> None:
    raise ValueError("kaboom in a worker")


@worker.handler("sleep")
def sleep(msg: gunicorn_ext.Message) -> int:
    marker = os.environ.get("SLEEP_MARKER_DIR")
    if marker:
        with open(os.path.join(marker, f"sleeping-{os.getpid()}"), "w") as f:
            f.write(str(worker.slot))
    time.sleep(float(msg.payload))
    return worker.slot


@worker.handler("bad_reply")
def bad_reply(msg: gunicorn_ext.Message) -> Any:
    return make_payload(msg.payload)


@worker.subscribe("news")
def news(msg: gunicorn_ext.Message) -> None:
    _record("news", msg)


@worker.on_error
def on_error(name: str, error: Exception) -> None:
    with _lock:
        _errors.append({"name": name, "error": type(error).__name__, "message": str(error)})


def make_payload(spec: str) -> Any:
    """A payload the bus can't carry, by name: ``big:N`` (N bytes of text), ``int``
    (beyond 64 bits), ``object`` (no msgpack form)."""
    if spec.startswith("big:"):
        return "x" * int(spec[4:])
    return {"int": 2**70, "neg_int": -(2**64), "object": object()}[spec]


def _json(start_response: Callable[..., Any], body: Any, status: str = "200 OK") -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _error(exc: Exception) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": str(exc), "slot": worker.slot}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ["PATH_INFO"]
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    payload = json.loads(q["payload"]) if "payload" in q else None
    if "make" in q:
        payload = make_payload(q["make"])
    to = int(q.get("to", gunicorn_ext.PRIMARY))
    try:
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        if path == "/whoami":
            return _json(start_response, {"pid": os.getpid(), "slot": worker.slot})
        if path == "/ask":
            value = worker.request(q["name"], payload, to=to, timeout=float(q.get("timeout", 5)))
            return _json(start_response, {"ok": value, "slot": worker.slot})
        if path == "/ask_other":  # with two workers: ask the one that is not us
            value = worker.request(q["name"], payload, to=1 - worker.slot, timeout=float(q["timeout"]))
            return _json(start_response, {"ok": value, "slot": worker.slot})
        if path == "/ask_many":  # many threads asking at once: every reply reaches its asker
            return _json(start_response, _ask_many(int(q["threads"]), int(q["n"]), to))
        if path == "/send":
            worker.send(q["name"], payload, to=to)
            return _json(start_response, {"sent": True, "slot": worker.slot})
        if path == "/flood":  # big one-way messages, as fast as the bus takes them
            n, blob = int(q["n"]), "x" * int(q["size"])
            for _ in range(n):
                worker.send("note", blob, to=to)
            return _json(start_response, {"sent": n, "slot": worker.slot})
        if path == "/sendmany":
            n = int(q["n"])
            for i in range(n):
                worker.send(q["name"], i, to=to)
            return _json(start_response, {"sent": n, "slot": worker.slot})
        if path == "/broadcast":
            worker.broadcast(q["name"], payload)
            return _json(start_response, {"sent": True, "slot": worker.slot})
        if path == "/publish":
            worker.publish(q["topic"], payload)
            return _json(start_response, {"sent": True, "slot": worker.slot})
        if path == "/inbox":
            with _lock:
                return _json(start_response, {"slot": worker.slot, "messages": list(_inbox)})
        if path == "/errors":
            with _lock:
                return _json(start_response, {"slot": worker.slot, "errors": list(_errors)})
        if path == "/garbage":
            return _json(start_response, _garbage(q["kind"]))
        if path == "/garbage_then_sleep":  # an in-flight request while the bus goes away
            sent = _garbage(q["kind"])
            time.sleep(float(q["s"]))
            return _json(start_response, sent)
    except gunicorn_ext.IPCError as exc:
        return _json(start_response, _error(exc), "502 Bad Gateway")
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


def _garbage(kind: str) -> dict[str, Any]:
    """Write a bad frame straight into this worker's bus socket."""
    import msgspec

    sock = worker._sock
    assert sock is not None
    if kind == "oversize":
        data = (1 << 30).to_bytes(4, "big") + b"x" * 16
    elif kind == "malformed":
        body = b"\xc1\xc1\xc1"
        data = len(body).to_bytes(4, "big") + body
    elif kind == "unknown":
        body = msgspec.msgpack.encode(["zz", 1, 2])
        data = len(body).to_bytes(4, "big") + body
    else:
        raise ValueError(kind)
    sock.sendall(data)
    return {"slot": worker.slot, "pid": os.getpid(), "sent": kind}


def _ask_many(threads: int, n: int, to: int) -> dict[str, Any]:
    wrong: list[Any] = []
    errors: list[str] = []

    def run(t: int) -> None:
        for i in range(n):
            key = [t, i]
            try:
                got = worker.request("echo", key, to=to, timeout=10)
            except gunicorn_ext.IPCError as exc:
                errors.append(repr(exc))
                continue
            if got["payload"] != key:
                wrong.append([key, got["payload"]])

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return {"slot": worker.slot, "done": threads * n, "wrong": wrong, "errors": errors}
