"""WSGI app for bench/lifecycle.py: a slow import, and a crash-looping mode.

Environment:

* ``APP_IMPORT_DELAY`` (seconds, default 0): sleep this long at import, like an
  app that loads a framework, models or a config at startup. It makes a HUP
  storm (every worker re-importing at once) visible under load.
* ``APP_READY_DIR``: when set, the import ends by writing ``<dir>/<pid>`` holding
  ``time.time()``: when this worker finished loading the app (the benchmark's
  readiness clock, the same for plain Gunicorn and gunicorn-ext).
* ``APP_MODE=exit_after_boot``: each worker ``os._exit(1)``s from a thread
  50 ms after the import. Exit code 1 is not one of Gunicorn's boot-error codes
  (3, 4), so plain Gunicorn respawns it at once, forever: a fork storm.

``GET /?sleep=S`` takes S seconds in the app (the SIGTERM rounds keep every thread
busy so that connections queue in the listen backlog).

Every response is JSON ``{"pid": ...}`` so the load generator can tell which
worker (old or new generation) answered. Works with and without gunicorn-ext
(it does not import it).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

IMPORT_DELAY = float(os.environ.get("APP_IMPORT_DELAY", "0") or 0)
MODE = os.environ.get("APP_MODE", "")

if IMPORT_DELAY > 0:
    time.sleep(IMPORT_DELAY)

if MODE == "exit_after_boot":
    _timer = threading.Timer(0.05, os._exit, args=(1,))
    _timer.daemon = True
    _timer.start()

_READY_DIR = os.environ.get("APP_READY_DIR")
if _READY_DIR:
    with open(os.path.join(_READY_DIR, str(os.getpid())), "w") as _f:
        _f.write(repr(time.time()))

_HEADERS_BASE = [("Content-Type", "application/json")]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    query = environ.get("QUERY_STRING", "")
    if query.startswith("sleep="):
        time.sleep(min(5.0, float(query[6:] or 0)))
    body = b'{"pid": %d}' % os.getpid()
    start_response("200 OK", [*_HEADERS_BASE, ("Content-Length", str(len(body)))])
    return [body]
