"""Gunicorn config for any WSGI app: ``gunicorn -c cluster_conf.py app:app``.

Every gunicorn-ext feature is on; settings come from the environment:
BIND (default 127.0.0.1:8000), WORKERS (default: the CPUs this process may
use), STATE_URL, SECRET_KEY, INSTANCE (default host:port of BIND).
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
threads = int(os.environ.get("THREADS", "4"))
timeout = int(os.environ.get("TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
os.environ.setdefault("INSTANCE", f"{socket.gethostname()}:{bind.rsplit(':', 1)[-1]}")

gunicorn_ext.enable(globals())
