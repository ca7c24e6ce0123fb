"""The config of bench/spread_plain_conf.py with gunicorn-ext enabled."""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = 4
worker_class = os.environ.get("SPREAD_WORKER_CLASS", "sync")
# threads > 1 would make Gunicorn run "sync" as gthread: 4 threads for gthread only.
threads = 4 if worker_class == "gthread" else 1
keepalive = 5
timeout = 60
backlog = 2048

# SPREAD_EVEN_SPREAD=0 turns even spread off, to tell the dispatch hop's cost from the
# rest of gunicorn-ext's (bench/spread.py's saturation figures).
_even = os.environ.get("SPREAD_EVEN_SPREAD", "")
gunicorn_ext.enable(globals(), **({"even_spread": _even == "1"} if _even else {}))
