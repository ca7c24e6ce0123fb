"""Plain Gunicorn config for bench/lifecycle.py (no gunicorn-ext).

Keep every setting identical to bench/lifecycle_ext_conf.py except the
gunicorn-ext lines there. Bind and worker count come from the environment.
"""

import os

bind = os.environ["BIND"]
workers = int(os.environ.get("WORKERS", "4"))
worker_class = "gthread"
threads = 4
timeout = 30
graceful_timeout = 10
keepalive = 2
