"""Tiny WSGI app for bench/nginx.py: answers with its own route, pinned by RouteCookie.

The route comes from GX_ROUTE (bench/nginx.py sets it to
``gunicorn_ext.sticky.route_name("127.0.0.1:<port>")``), so the body tells which
backend answered and the ``gx_route`` cookie names the same backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gunicorn_ext.sticky import RouteCookie, default_route

ROUTE = default_route()
_BODY = ROUTE.encode() + b"\n"
_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(_BODY)))]


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", list(_HEADERS))
    return [_BODY]


app = RouteCookie(_app, route=ROUTE)
