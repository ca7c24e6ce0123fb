"""Plain Gunicorn config of bench/spread.py (no gunicorn-ext).

Keep every setting identical to bench/spread_ext_conf.py except the last line there.
"""

import os

bind = os.environ["BIND"]
workers = 4
worker_class = os.environ.get("SPREAD_WORKER_CLASS", "sync")
# threads > 1 would make Gunicorn run "sync" as gthread: 4 threads for gthread only.
threads = 4 if worker_class == "gthread" else 1
keepalive = 5
timeout = 60
backlog = 2048
