"""The config of bench/spread_plain_conf.py with gunicorn-ext enabled."""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = 4
worker_class = os.environ.get("SPREAD_WORKER_CLASS", "sync")
threads = 4
keepalive = 5
timeout = 60
backlog = 2048

gunicorn_ext.enable(globals())
