"""Gunicorn config for any WSGI app: ``gunicorn -c cluster_conf.py app:app``.

Every gunicorn-ext feature is on; settings come from the environment:
BIND (default 127.0.0.1:8000), WORKERS (default: the CPUs this process may
use), THREADS (default 32), STATE_URL (default an SQLite file beside this
config), SECRET_KEY, INSTANCE (default host:port of BIND), ADMIN_BIND (the primary's own
/metrics /status /livez /readyz, e.g. 127.0.0.1:9191; default off).
"""

import logging
import os
import socket

import gunicorn_ext
from gunicorn_ext.cpus import usable_cpus

bind = os.environ.get("BIND", "127.0.0.1:8000")
_cpus = usable_cpus()
workers = int(os.environ.get("WORKERS", _cpus))
if workers > 2 * _cpus:
    logging.getLogger("gunicorn.error").warning(
        "WORKERS=%s is more than twice the %s CPU(s) this process may use", workers, _cpus)
worker_class = os.environ.get("WORKER_CLASS", "gthread")
# An open WebSocket (the example's /ws chat, Socket.IO's websocket transport) holds one
# gthread thread while it lasts, so THREADS caps a worker's WebSockets plus its requests
# in flight; the pool makes threads on demand, so a high cap costs little when idle.
threads = int(os.environ.setdefault("THREADS", "32"))
timeout = int(os.environ.get("TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
os.environ.setdefault("INSTANCE", f"{socket.gethostname()}:{bind.rsplit(':', 1)[-1]}")
# Shared state (sessions, /hits): an SQLite file beside this config unless STATE_URL
# names another store (redis://..., redis+sentinel://..., redis+cluster://...).
os.environ.setdefault(
    "STATE_URL", "sqlite:///" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "state.db"))
if not os.environ.get("SECRET_KEY"):
    logging.getLogger("gunicorn.error").warning(
        "SECRET_KEY is not set: using a development key; set it in production")

# WORKER_PORTS_BASE=9000: slot N also listens on 9000+N, and every response pins its client
# to the worker that answered with the route cookie gx_route=<host>_<port> (gunicorn-ext's
# `sticky` setting, on with per-worker ports), so nginx rendered with the worker ports as
# backends keeps a Socket.IO long-polling session on one worker. The app has no sticky code.
# REQUEST_TIMEOUT: a request running longer has its stack logged, gets 503, and its worker
# is recycled (Socket.IO's long-polling holds a request up to 25 s; WebSockets are exempt).
# ADMIN_BIND=127.0.0.1:9191: the primary itself serves /metrics /status /livez /readyz there.
gunicorn_ext.enable(globals(), worker_ports_base=int(os.environ.get("WORKER_PORTS_BASE", "0")),
                    request_timeout=float(os.environ.get("REQUEST_TIMEOUT", "60")),
                    admin_bind=os.environ.get("ADMIN_BIND", ""))
