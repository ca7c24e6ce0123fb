"""What the ASGI test apps (async_app.py, life_asgi_app.py) share: lifespan, query
strings and responses, so each app is only its routes.

:func:`serve` makes an ASGI app of ``async route(scope) -> (status, body)``: lifespan
answered, non-HTTP scopes ignored (the server refuses a WebSocket upgrade), a ``str``
body sent as text, anything else as JSON. (examples/asgi_app stays self-contained.)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]
Route = Callable[[Scope], Awaitable[tuple[int, Any]]]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


def query(scope: Scope) -> dict[str, str]:
    """The query string's parameters, the first value of each."""
    return {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}


async def respond(send: Any, status: int, body: Any) -> None:
    if isinstance(body, str):
        data, content_type = body.encode(), b"text/plain"
    else:
        data, content_type = json.dumps(body).encode(), b"application/json"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def serve(route: Route) -> ASGIApp:
    """The ASGI app answering each HTTP request with ``await route(scope)``."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            status, body = await route(scope)
            await respond(send, status, body)

    return app
