"""Trivial ASGI app for the hello-world req/s comparison of the asyncio worker classes."""

from __future__ import annotations

from typing import Any

_BODY = b"Hello, world!\n"
_START = {"type": "http.response.start", "status": 200,
          "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(_BODY)).encode())]}
_MSG = {"type": "http.response.body", "body": _BODY}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send(_START)
    await send(_MSG)
