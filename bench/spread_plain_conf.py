"""Plain Gunicorn config of bench/spread.py (no gunicorn-ext).

Keep every setting identical to bench/spread_ext_conf.py except the last line there.
"""

import os

bind = os.environ["BIND"]
workers = 4
worker_class = os.environ.get("SPREAD_WORKER_CLASS", "sync")
threads = 4
keepalive = 5
timeout = 60
backlog = 2048
