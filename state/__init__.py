"""Shared state for stateless workers: a small store interface with Redis and SQLite
backends, shared primitives (counters, TTL cache, locks) and Flask server-side sessions
(``from gunicorn_ext.state.flask import Session``)."""

from .store import (
    Batch,
    LockTimeout,
    NotAnInteger,
    Store,
    StoreError,
    StoreUnavailable,
    WrongType,
    open_store,
)

__all__ = ["Batch", "LockTimeout", "NotAnInteger", "Store", "StoreError", "StoreUnavailable",
           "WrongType", "open_store"]
