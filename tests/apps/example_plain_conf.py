"""Plain Gunicorn for the example app (no gunicorn-ext): the baseline of the chaos runs.

The same settings as examples/flask_app/cluster_conf.py, without ``gunicorn_ext.enable``:
``gunicorn -c tests/apps/example_plain_conf.py --chdir examples/flask_app app:app``.
"""

import os
import socket

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.setdefault("THREADS", "32"))
timeout = int(os.environ.get("TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
os.environ.setdefault("INSTANCE", f"{socket.gethostname()}:{bind.rsplit(':', 1)[-1]}")
