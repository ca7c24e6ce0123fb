"""Gunicorn config for bench/ipc.py: one worker (sync, or WORKER_CLASS) plus the bench handlers."""

import os

import gunicorn_ext
from gunicorn_ext import primary

bind = os.environ["BIND"]
workers = 1
worker_class = os.environ.get("WORKER_CLASS", "sync")
timeout = 300
_count = [0]


@primary.handler("ping")
def ping(msg: gunicorn_ext.Message) -> object:
    return msg.payload


@primary.handler("count")
def count(msg: gunicorn_ext.Message) -> None:
    _count[0] += 1


@primary.handler("reset")
def reset(msg: gunicorn_ext.Message) -> None:
    _count[0] = 0


@primary.handler("total")
def total(msg: gunicorn_ext.Message) -> int:
    return _count[0]


gunicorn_ext.enable(globals())
