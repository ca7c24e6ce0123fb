"""The hello-world config of bench/hello_plain_conf.py with gunicorn-ext enabled."""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = 2
# bench/ipc.py measures each worker class (HELLO_WORKER_CLASS); sync by default.
worker_class = os.environ.get("HELLO_WORKER_CLASS", "sync")
threads = 4 if worker_class == "gthread" else 1
timeout = 60

gunicorn_ext.enable(globals())
