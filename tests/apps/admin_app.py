"""Test-only app for the admin endpoint: ``/block`` holds its thread until released.

A request to ``/block`` waits until the file named by ``ADMIN_APP_RELEASE`` exists
(at most 20 s), so a test can occupy every worker thread and then let them all go.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

RELEASE = os.environ.get("ADMIN_APP_RELEASE", "")
BLOCK_LIMIT = 20.0


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path == "/block":
        deadline = time.monotonic() + BLOCK_LIMIT
        while not (RELEASE and os.path.exists(RELEASE)) and time.monotonic() < deadline:
            time.sleep(0.02)
        body = b"released"
    elif path == "/healthz":
        body = b"ok"
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
