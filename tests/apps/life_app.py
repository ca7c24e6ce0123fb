"""Test app for lifecycle tests: crashes, leaks, hangs and versions on demand."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from gunicorn_ext import worker

MODE = os.environ.get("APP_MODE", "")
VERSION_FILE = os.environ.get("APP_VERSION_FILE")
VERSION = Path(VERSION_FILE).read_text().strip() if VERSION_FILE else "1"
if VERSION == "broken" or MODE == "import_error":
    raise ImportError("this deploy is broken on purpose (life_app)")
if VERSION == "hang":  # a deploy whose workers never get to serve
    time.sleep(3600)

_leak: list[bytes] = []


def hang_here(seconds: float) -> None:
    time.sleep(seconds)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ["PATH_INFO"]
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if MODE == "crash_every_request" and path != "/healthz":
        os._exit(1)
    if path == "/leak":
        _leak.append(os.urandom(int(q.get("mb", "1")) << 20))
    elif path == "/hang":
        hang_here(float(q.get("s", "30")))
    elif path == "/slow":
        time.sleep(float(q.get("s", "1")))
    body = json.dumps({"pid": os.getpid(), "slot": worker.slot, "version": VERSION}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
