"""Test app for tests/test_sticky.py: a Flask app pinned by RouteCookie (route from GX_ROUTE)."""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

from gunicorn_ext.sticky import RouteCookie

app = Flask(__name__)
app.wsgi_app = RouteCookie(app.wsgi_app)  # type: ignore[method-assign]


@app.get("/healthz")
def healthz() -> str:
    return "ok"


@app.get("/")
def index():  # type: ignore[no-untyped-def]
    return jsonify(route=os.environ["GX_ROUTE"], pid=os.getpid(), cookie=request.cookies.get("gx_route"))
