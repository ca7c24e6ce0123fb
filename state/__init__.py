"""Shared state for stateless workers: a small store interface with Redis and SQLite
backends, shared primitives (counters, TTL cache, locks) and Flask server-side sessions
(``from state.flask import Session``)."""
