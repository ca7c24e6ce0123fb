"""Gunicorn config for the Socket.IO tests: gthread workers (one thread per websocket)."""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = int(os.environ.get("WORKERS", "2"))
worker_class = "gthread"
threads = 8
timeout = 30
graceful_timeout = 5

# WORKER_PORTS_BASE: slot N also listens on base+N, so a test can reach each worker.
gunicorn_ext.enable(globals(), worker_ports_base=int(os.environ.get("WORKER_PORTS_BASE", "0")))
