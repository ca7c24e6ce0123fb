"""The ASGI twin of life_app.py for the lifecycle matrix: leaks, hangs and versions."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from gunicorn_ext import worker

VERSION_FILE = os.environ.get("APP_VERSION_FILE")
VERSION = Path(VERSION_FILE).read_text().strip() if VERSION_FILE else "1"

_leak: list[bytes] = []


def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call in async code: the hung worker under test


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    q = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    if path == "/leak":
        _leak.append(os.urandom(int(q.get("mb", "1")) << 20))
    elif path == "/hang":
        block_the_loop(float(q.get("s", "30")))
    elif path == "/slow":
        await asyncio.sleep(float(q.get("s", "1")))
    body = json.dumps({"pid": os.getpid(), "slot": worker.slot, "version": VERSION}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
