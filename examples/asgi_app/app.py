"""The ASGI example: gunicorn-ext's bus from async code, in plain ASGI (no framework).

Run by ``make run-asgi`` (``-k asgi``; ``WORKER_CLASS=uvicorn_worker.UvicornWorker``
for uvicorn). Every call to the bus here is ``await``-ed, so no request blocks the
event loop, and the broadcast handler is an ``async def`` run on the worker's loop.

    GET  /healthz          ok
    GET  /whoami           this worker's pid, slot and instance
    GET  /peer?slot=N      ask worker slot N who it is (a request to an async handler)
    GET  /cluster          the primary's view of the workers
    POST /broadcast        {"message": ...} to every worker's inbox
    GET  /inbox            what this worker received by broadcast
    GET  /metrics          Prometheus text of the whole instance
    /socket.io/            Socket.IO, namespace /chat (python-socketio's AsyncServer)

The Socket.IO namespace ``/chat`` is the Flask example's: ``where`` is acknowledged with
this worker's slot, pid and instance; ``say {"text": ...}`` sends ``said`` (the message
and the worker that took it) to every client of every worker, through the bus
(:class:`gunicorn_ext.socketio.AsyncBusManager`), and is acknowledged with its
``{"id": ...}``, or ``{"error": ...}`` for bad input, which is not sent to anyone.
Long-polling clients need every request on one worker: per-worker ports
(``WORKER_PORTS_BASE``) behind the nginx ``gunicorn-ext nginx render`` gives, which the
route cookie pins; websocket-only clients need nothing.
"""

from __future__ import annotations

import collections
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import socketio

import gunicorn_ext
from gunicorn_ext import worker
from gunicorn_ext.socketio import AsyncBusManager

INSTANCE = os.environ.get("INSTANCE", "local")
MAX_BODY = 8 * 1024 * 1024
#: Largest chat message (UTF-8 bytes of its text), and largest Socket.IO packet read.
MAX_MESSAGE = 4096
MAX_PACKET = 64 * 1024
#: Messages this worker received by broadcast, newest last (bounded).
_inbox: collections.deque[object] = collections.deque(maxlen=1000)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@worker.handler("broadcast")
async def _on_broadcast(msg: gunicorn_ext.Message) -> None:
    _inbox.append(msg.payload)  # on the worker's loop: no lock needed


@worker.handler("whoami")
async def _whoami(msg: gunicorn_ext.Message) -> dict[str, Any]:
    return {"pid": os.getpid(), "slot": worker.slot, "asked_by": msg.src}


class HTTPError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status


async def respond(send: Send, status: int, body: bytes | str | Any,
                  content_type: str = "application/json") -> None:
    if isinstance(body, str):
        data = body.encode()
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def read_json(scope: Scope, receive: Receive) -> Any:
    """The request's JSON body: over MAX_BODY is a 413, not JSON (or too deep) a 400."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPError(413, f"request body is over {MAX_BODY >> 20} MiB")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:
        raise HTTPError(400, "JSON nested too deep")
    except ValueError as exc:
        raise HTTPError(400, f"body is not valid JSON: {exc}")


async def route(scope: Scope, receive: Receive) -> tuple[int, Any, str]:
    method, path = scope["method"], scope["path"]
    text = "text/plain; charset=utf-8"
    if (method, path) == ("GET", "/healthz"):
        return 200, "ok", text
    if (method, path) == ("GET", "/whoami"):
        return 200, {"pid": os.getpid(), "slot": worker.slot, "instance": INSTANCE}, ""
    if (method, path) == ("GET", "/peer"):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            slot = int(query["slot"][0])
        except (KeyError, ValueError):
            raise HTTPError(400, "expected ?slot=<worker slot number>")
        if slot < 0:
            raise HTTPError(400, "a slot number is >= 0")
        try:
            return 200, await worker.arequest("whoami", to=slot, timeout=2.0), ""
        except gunicorn_ext.WorkerGone as exc:
            raise HTTPError(404, str(exc))
        except gunicorn_ext.IPCError as exc:
            raise HTTPError(503, str(exc))
    if (method, path) == ("GET", "/cluster"):
        try:
            return 200, await worker.arequest("gunicorn_ext.cluster", timeout=2.0), ""
        except gunicorn_ext.IPCError as exc:
            raise HTTPError(503, str(exc))
    if (method, path) == ("POST", "/broadcast"):
        body = await read_json(scope, receive)
        if not isinstance(body, dict) or "message" not in body:
            raise HTTPError(400, 'expected a JSON object {"message": ...}')
        try:
            await worker.abroadcast("broadcast", body["message"])
        except gunicorn_ext.MessageTooLarge as exc:  # refused before sending: the bus is fine
            raise HTTPError(413, str(exc))
        except gunicorn_ext.UnencodableMessage as exc:
            raise HTTPError(400, str(exc))
        except gunicorn_ext.IPCError as exc:
            raise HTTPError(503, str(exc))
        return 202, {"sent": True, "slot": worker.slot}, ""
    if (method, path) == ("GET", "/inbox"):
        return 200, {"slot": worker.slot, "pid": os.getpid(), "messages": list(_inbox)}, ""
    if (method, path) == ("GET", "/metrics"):
        try:
            metrics = await worker.arequest("gunicorn_ext.metrics", timeout=5.0)
        except gunicorn_ext.IPCError as exc:
            return 503, f"# metrics unavailable: {exc}\n", text
        return 200, metrics, "text/plain; version=0.0.4; charset=utf-8"
    raise HTTPError(404, f"no route {method} {path}")


async def http_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return  # no WebSocket routes here: the server refuses the upgrade
    try:
        status, body, content_type = await route(scope, receive)
    except HTTPError as exc:
        status, body, content_type = exc.status, {"error": str(exc), "slot": worker.slot}, ""
    await respond(send, status, body, content_type or "application/json")


# -- Socket.IO: the namespace /chat, every worker's clients sharing each message -----------

sio = socketio.AsyncServer(async_mode="asgi", max_http_buffer_size=MAX_PACKET,
                           client_manager=AsyncBusManager(channel="gunicorn-ext-example:socketio"))


@sio.on("where", namespace="/chat")
async def where(sid: str, *_: Any) -> dict[str, Any]:
    return {"slot": worker.slot, "pid": os.getpid(), "instance": INSTANCE}


@sio.on("say", namespace="/chat")
async def say(sid: str, data: Any = None) -> dict[str, Any]:
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        return {"error": 'expected a JSON object {"text": "..."} with a non-empty string'}
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MESSAGE:
        return {"error": f"text too large: at most {MAX_MESSAGE} bytes"}
    message = {"type": "message", "id": uuid.uuid4().hex, "text": text, "slot": worker.slot,
               "pid": os.getpid(), "instance": INSTANCE, "time": round(time.time(), 3)}
    # To this worker's clients at once, and over the bus to every other worker's.
    await sio.emit("said", message, namespace="/chat")
    return {"id": message["id"]}


#: What Gunicorn serves: Socket.IO at /socket.io/, everything else (lifespan too) http_app.
app = socketio.ASGIApp(sio, other_asgi_app=http_app)
