"""Plain Gunicorn config for the hello-world baseline (no gunicorn-ext).

Keep every setting identical to bench/hello_ext_conf.py except its last line (gunicorn_ext.enable).
"""

import os

bind = os.environ["BIND"]
workers = int(os.environ.get("HELLO_WORKERS", "2"))  # bench/hello.py sets it per class
# bench/hello.py and bench/ipc.py measure each worker class (HELLO_WORKER_CLASS); sync by default.
worker_class = os.environ.get("HELLO_WORKER_CLASS", "sync")
threads = 4 if worker_class == "gthread" else 1
timeout = 60
