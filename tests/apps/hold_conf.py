"""Gunicorn config for the even-spread and deadline tests: class, threads and settings
from the environment."""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = int(os.environ.get("WORKERS", "2"))
worker_class = os.environ.get("WORKER_CLASS", "gthread")
threads = int(os.environ.get("THREADS", "1"))
graceful_timeout = 5

_even = os.environ.get("EVEN_SPREAD", "1")
gunicorn_ext.enable(globals(), even_spread=None if _even == "default" else _even == "1",
                    request_timeout=float(os.environ.get("REQUEST_TIMEOUT", "0")),
                    stats_interval=0.2)
