"""The ASGI twin of life_app.py for the lifecycle matrix: leaks, hangs and versions."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from asgi_parts import query, serve

from gunicorn_ext import worker

VERSION_FILE = os.environ.get("APP_VERSION_FILE")
VERSION = Path(VERSION_FILE).read_text().strip() if VERSION_FILE else "1"

_leak: list[bytes] = []


def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call in async code: the hung worker under test


async def route(scope: dict[str, Any]) -> tuple[int, Any]:
    path, q = scope["path"], query(scope)
    if path == "/leak":
        _leak.append(os.urandom(int(q.get("mb", "1")) << 20))
    elif path == "/hang":
        block_the_loop(float(q.get("s", "30")))
    elif path == "/slow":
        await asyncio.sleep(float(q.get("s", "1")))
    return 200, {"pid": os.getpid(), "slot": worker.slot, "version": VERSION}


_app = serve(route)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan" and VERSION == "badstart":  # a deploy whose startup fails
        await receive()
        await send({"type": "lifespan.startup.failed",
                    "message": "this deploy's startup fails on purpose"})
        return
    await _app(scope, receive, send)
