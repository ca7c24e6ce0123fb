"""Gunicorn config for any ASGI app: ``gunicorn -c cluster_conf.py app:app``.

The ASGI twin of ``examples/flask_app/cluster_conf.py``, every gunicorn-ext feature on.
From the environment: BIND (default 127.0.0.1:8000), WORKERS (default: the CPUs this
process may use), WORKER_CLASS (default ``asgi``, Gunicorn's own asyncio worker; or
``uvicorn_worker.UvicornWorker``), WORKER_CONNECTIONS (default 1000), INSTANCE
(default host:port of BIND), WORKER_PORTS_BASE (default 0: off).
"""

import os
import socket

import gunicorn_ext
from gunicorn_ext.cpus import usable_cpus

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WORKERS", usable_cpus()))
worker_class = os.environ.get("WORKER_CLASS", "asgi")
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
timeout = int(os.environ.get("TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
os.environ.setdefault("INSTANCE", f"{socket.gethostname()}:{bind.rsplit(':', 1)[-1]}")

# Per-worker ports and the route cookie work as in the Flask example (an ASGI middleware
# sets the cookie). request_timeout is a WSGI feature: an async app bounds its own awaits.
gunicorn_ext.enable(globals(), worker_ports_base=int(os.environ.get("WORKER_PORTS_BASE", "0")))
