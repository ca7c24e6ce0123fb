"""Test ASGI app: the async bus API over HTTP (the ASGI twin of busapp.py), run with
bus_conf.py under ``-k asgi`` or ``uvicorn_worker.UvicornWorker``."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

from asgi_parts import query, serve

import gunicorn_ext
from gunicorn_ext import worker

_inbox: list[dict[str, Any]] = []
_errors: list[dict[str, Any]] = []


def _record(kind: str, msg: gunicorn_ext.Message, **extra: Any) -> None:
    _inbox.append({"kind": kind, "name": msg.name, "payload": msg.payload, "src": msg.src,
                   **extra})


def _on_loop() -> bool:
    try:
        return asyncio.get_running_loop() is worker.loop
    except RuntimeError:
        return False


@worker.handler("echo")
async def echo(msg: gunicorn_ext.Message) -> dict[str, Any]:
    return {"slot": worker.slot, "pid": os.getpid(), "payload": msg.payload, "src": msg.src,
            "on_loop": _on_loop()}


@worker.handler("sync_echo")
def sync_echo(msg: gunicorn_ext.Message) -> dict[str, Any]:
    return {"slot": worker.slot, "thread": threading.current_thread().name,
            "on_loop": _on_loop()}


@worker.handler("note")
async def note(msg: gunicorn_ext.Message) -> None:
    _record("note", msg, on_loop=_on_loop())


@worker.handler("boom")
async def boom(msg: gunicorn_ext.Message) -> None:
    await asyncio.sleep(0)
    raise ValueError("kaboom in an async handler")


@worker.handler("nap")
async def nap(msg: gunicorn_ext.Message) -> float:
    marker = os.environ.get("SLEEP_MARKER_DIR")
    if marker:  # tells a test which worker is napping
        with open(os.path.join(marker, f"napping-{os.getpid()}"), "w") as f:
            f.write(str(worker.slot))
    await asyncio.sleep(float(msg.payload))
    return float(msg.payload)


@worker.handler("sync_nap")
def sync_nap(msg: gunicorn_ext.Message) -> float:
    time.sleep(float(msg.payload))  # in the listener thread, not on the loop
    return float(msg.payload)


@worker.handler("bad_reply")
async def bad_reply(msg: gunicorn_ext.Message) -> object:
    return object()


@worker.subscribe("news")
async def news(msg: gunicorn_ext.Message) -> None:
    _record("news", msg, on_loop=_on_loop())


@worker.on_error
def on_error(name: str, error: Exception) -> None:
    _errors.append({"name": name, "error": type(error).__name__, "message": str(error)})


def _error(exc: Exception) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": str(exc), "slot": worker.slot}


async def _flood(n: int, name: str, payload: Any, to: int) -> dict[str, Any]:
    """``n`` requests at once from this worker's loop; every reply must reach its asker."""
    t0 = time.perf_counter()
    replies = await asyncio.gather(
        *(worker.arequest(name, payload, to=to, timeout=20) for _ in range(n)),
        return_exceptions=True)
    errors = [repr(r) for r in replies if isinstance(r, BaseException)]
    return {"n": n, "errors": errors[:5], "seconds": time.perf_counter() - t0}


async def handle(path: str, q: dict[str, str]) -> Any:
    payload = json.loads(q["payload"]) if "payload" in q else None
    if q.get("make") == "object":
        payload = object()
    elif q.get("make", "").startswith("big:"):
        payload = "x" * int(q["make"][4:])
    to = int(q.get("to", gunicorn_ext.PRIMARY))
    if path == "/whoami":
        return {"pid": os.getpid(), "slot": worker.slot}
    if path == "/ask":
        value = await worker.arequest(q["name"], payload, to=to, timeout=float(q.get("timeout", 5)))
        return {"ok": value, "slot": worker.slot}
    if path == "/ask_other":  # with two workers: ask the one that is not us
        value = await worker.arequest(q["name"], payload, to=1 - worker.slot,
                                      timeout=float(q.get("timeout", 5)))
        return {"ok": value, "slot": worker.slot}
    if path == "/garbage_then_ask":  # a request in flight while the primary drops our bus
        task = asyncio.ensure_future(worker.arequest("nap", 10, to=1 - worker.slot, timeout=20))
        await asyncio.sleep(0.2)
        worker._write_bytes(b"\x00\x00\x00\x05" + b"\xc1" * 5)  # not a frame: the primary hangs up
        t0 = time.perf_counter()
        try:
            await task
        except gunicorn_ext.IPCError as exc:
            return {**_error(exc), "pid": os.getpid(), "seconds": time.perf_counter() - t0}
        return {"ok": "no error", "pid": os.getpid()}
    if path == "/sync_ask":  # the blocking API on the loop: refused, clearly
        return {"ok": worker.request(q["name"], payload, to=to)}
    if path == "/sync_ask_in_thread":  # the blocking API off the loop: works
        value = await asyncio.to_thread(worker.request, q["name"], payload, to)
        return {"ok": value, "slot": worker.slot}
    if path == "/flood":
        return await _flood(int(q["n"]), q["name"], payload, to)
    if path == "/send":
        await worker.asend(q["name"], payload, to=to)
        return {"sent": True, "slot": worker.slot}
    if path == "/broadcast":
        await worker.abroadcast(q["name"], payload)
        return {"sent": True, "slot": worker.slot}
    if path == "/publish":
        await worker.apublish(q["topic"], payload)
        return {"sent": True, "slot": worker.slot}
    if path == "/inbox":
        return {"slot": worker.slot, "messages": list(_inbox)}
    if path == "/errors":
        return {"slot": worker.slot, "errors": list(_errors)}
    if path == "/slow":
        t0 = time.perf_counter()
        await asyncio.sleep(float(q.get("s", "0.2")))
        return {"slot": worker.slot, "seconds": time.perf_counter() - t0}
    return None


async def route(scope: dict[str, Any]) -> tuple[int, Any]:
    if scope["path"] == "/healthz":
        return 200, "ok"
    try:
        body = await handle(scope["path"], query(scope))
    except (gunicorn_ext.IPCError, RuntimeError, ValueError) as exc:
        return (500 if isinstance(exc, RuntimeError) else 409), _error(exc)
    return (404, {"error": "no route"}) if body is None else (200, body)


app = serve(route)
