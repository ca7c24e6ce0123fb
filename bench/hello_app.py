"""Trivial WSGI app for the hello-world req/s comparison in bench/ipc.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_BODY = b"Hello, world!\n"
_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(_BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", _HEADERS)
    return [_BODY]
