"""The hello-world config of bench/hello_plain_conf.py with every gunicorn-ext feature on.

What examples/flask_app/cluster_conf.py turns on, and the per-request features it leaves
to the environment: metrics and the reporter (always), the bus, request deadlines
(request_timeout, as the example's default), the route cookie (sticky=True: the example
sets it with per-worker ports), the soft memory limit checked after each request (set high
so it never fires), max_lifetime, rolling HUP, and even spread (the default, gthread).
"""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = int(os.environ.get("HELLO_WORKERS", "2"))  # bench/hello.py sets it per class
# bench/hello.py and bench/ipc.py measure each worker class (HELLO_WORKER_CLASS); sync by default.
worker_class = os.environ.get("HELLO_WORKER_CLASS", "sync")
threads = 4 if worker_class == "gthread" else 1
timeout = 60

gunicorn_ext.enable(globals(), request_timeout=60, sticky=True, memory_soft_limit="4G",
                    max_lifetime=3600, hup="rolling")
