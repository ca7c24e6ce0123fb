"""Plain Gunicorn config for the hello-world baseline (no gunicorn-ext).

Keep every setting identical to bench/hello_ext_conf.py except the last line there.
"""

import os

bind = os.environ["BIND"]
workers = 2
worker_class = "sync"
timeout = 60
