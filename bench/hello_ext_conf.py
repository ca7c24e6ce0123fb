"""The hello-world config of bench/hello_plain_conf.py with gunicorn-ext enabled."""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = 2
worker_class = "sync"
timeout = 60

gunicorn_ext.enable(globals())
