"""The handler of bench/spread.py: burns a fixed 2 ms of CPU, answers with its pid.

The pid in the body tells the load generator which worker served each request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

BURN_S = float(os.environ.get("SPREAD_BURN_MS", "2")) / 1000.0


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    end = time.thread_time() + BURN_S
    while time.thread_time() < end:
        pass
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
