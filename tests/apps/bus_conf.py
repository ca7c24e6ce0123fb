"""Gunicorn config for the bus tests: primary handlers plus a user hook to compose with."""

import os
import threading
import time

import gunicorn_ext
from gunicorn_ext import primary

bind = os.environ["BIND"]
workers = int(os.environ.get("WORKERS", "2"))
worker_class = os.environ.get("WORKER_CLASS", "gthread")
threads = 4 if worker_class == "gthread" else 1  # threads > 1 turns sync into gthread
timeout = 30
graceful_timeout = 5
max_requests = int(os.environ.get("MAX_REQUESTS", "0"))

_records: list[object] = []
_results: list[object] = []
_forks = [0]


def post_fork(server, worker):  # a user hook: enable() must keep it
    _forks[0] += 1
    server.log.info("user post_fork hook ran for slot %s", gunicorn_ext.worker.slot)


@primary.handler("echo")
def echo(msg):
    return {"primary": True, "payload": msg.payload, "src": msg.src, "pid": os.getpid()}


@primary.handler("boom")
def boom(msg):
    raise ValueError("kaboom in the primary")


@primary.handler("slow")
def slow(msg):
    time.sleep(float(msg.payload))
    return "late"


@primary.handler("bad_reply")
def bad_reply(msg):
    if msg.payload.startswith("big:"):
        return "x" * int(msg.payload[4:])
    return {"int": 2**70, "object": object()}[msg.payload]


@primary.handler("record")
def record(msg):
    _records.append(msg.payload)


@primary.handler("records")
def records(msg):
    out = list(_records)
    _records.clear()
    return out


@primary.handler("primary_ask")
def primary_ask(msg):
    """Run the primary's own API from a thread of the arbiter (not the hub thread)."""
    kind, slot, name, payload = msg.payload
    if payload == "UNENCODABLE":
        payload = object()
    elif payload == "HUGE_INT":
        payload = 2**70
    elif payload == "TOO_LARGE":
        payload = "x" * (5 * 1024 * 1024)

    def run():
        try:
            if kind == "request":
                _results.append({"ok": primary.request(slot, name, payload, timeout=3.0)})
            elif kind == "send":
                primary.send(slot, name, payload)
                _results.append({"ok": "sent"})
            elif kind == "broadcast":
                primary.broadcast(name, payload)
                _results.append({"ok": "sent"})
            elif kind == "publish":
                primary.publish(name, payload)
                _results.append({"ok": "sent"})
        except gunicorn_ext.IPCError as exc:
            _results.append({"error": type(exc).__name__, "message": str(exc)})

    threading.Thread(target=run, daemon=True).start()


@primary.handler("primary_results")
def primary_results(msg):
    out = list(_results)
    _results.clear()
    return out


gunicorn_ext.enable(globals(), ipc_max_backlog=int(os.environ.get("IPC_MAX_BACKLOG", 64 << 20)))
