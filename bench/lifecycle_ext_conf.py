"""bench/lifecycle_plain_conf.py with gunicorn-ext enabled (its default settings).

Only override: ``RESTART_STABLE_AFTER`` in the environment sets
``restart_stable_after`` (the SIGKILL latency rounds use it so that every kill
of a worker that has run a while is a first crash, as an occasional OOM kill
would be); unset, the default (30 s) applies. ``HUP=rolling`` sets ``hup="rolling"``
(the rolling-HUP rounds), ``EVEN_SPREAD=0`` sets ``even_spread=False`` (a SIGTERM
series) and ``RELOAD_BATCH`` sets ``reload_batch``.
"""

import os

import gunicorn_ext

bind = os.environ["BIND"]
workers = int(os.environ.get("WORKERS", "4"))
worker_class = "gthread"
threads = 4
timeout = 30
graceful_timeout = 10
keepalive = 2

_overrides = {}
if os.environ.get("RESTART_STABLE_AFTER"):
    _overrides["restart_stable_after"] = float(os.environ["RESTART_STABLE_AFTER"])
if os.environ.get("HUP"):
    _overrides["hup"] = os.environ["HUP"]
if os.environ.get("EVEN_SPREAD") == "0":
    _overrides["even_spread"] = False
if os.environ.get("RELOAD_BATCH"):
    _overrides["reload_batch"] = int(os.environ["RELOAD_BATCH"])

gunicorn_ext.enable(globals(), **_overrides)
