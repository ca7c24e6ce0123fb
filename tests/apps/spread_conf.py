"""Gunicorn config for the even-spread tests: class, threads and the setting from the env."""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = int(os.environ.get("WORKERS", "2"))
worker_class = os.environ.get("WORKER_CLASS", "gthread")
threads = int(os.environ.get("THREADS", "1"))
graceful_timeout = 5

gunicorn_ext.enable(globals(), even_spread=os.environ.get("EVEN_SPREAD", "1") == "1",
                    stats_interval=0.2)
