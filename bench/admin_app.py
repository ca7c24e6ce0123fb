"""App for bench/admin.py: ``/block`` holds its thread; ``/metrics`` as the example serves it.

``/block`` waits until the file named by ``BENCH_RELEASE`` exists (at most 60 s), so the
benchmark can occupy every worker thread. ``/metrics`` asks the primary over the bus,
exactly like examples/flask_app's ``/metrics``: what an app-port scrape costs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import gunicorn_ext
from gunicorn_ext import worker

RELEASE = os.environ.get("BENCH_RELEASE", "")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ["PATH_INFO"]
    ctype = "text/plain"
    status = "200 OK"
    if path == "/block":
        deadline = time.monotonic() + 60
        while not (RELEASE and os.path.exists(RELEASE)) and time.monotonic() < deadline:
            time.sleep(0.02)
        body = b"released"
    elif path == "/metrics":
        try:
            body = worker.request("gunicorn_ext.metrics", timeout=5.0).encode()
            ctype = "text/plain; version=0.0.4; charset=utf-8"
        except gunicorn_ext.IPCError as exc:
            status, body = "503 Service Unavailable", f"# metrics unavailable: {exc}\n".encode()
    elif path == "/healthz":
        body = b"ok"
    else:
        status, body = "404 Not Found", b"not found"
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]
