"""pytest plugin for running Flask's own test suite (tests/test_flask_suite.py starts it).

Loaded with ``-p flask_suite_plugin`` in a pytest run inside Flask's unpacked sdist.
Environment:

* ``GX_FLASK_SUITE_STORE`` -- a store URL: every ``Flask(...)`` the suite creates gets
  ``gunicorn_ext.state.flask.Session(app, store=...)``, as an app would call it, on one
  store opened once for the run (unless the app brings its own session interface). Unset: Flask's cookie session (the baseline).
* ``GX_FLASK_SUITE_CONFIG`` -- JSON: config keys each app gets before ``Session(app)``
  (unless the test set them already).
* ``GX_FLASK_SUITE_SKIP`` -- JSON ``{test id: reason}``: tests skipped on purpose.
* ``GX_FLASK_SUITE_REPORT`` -- a file that gets, as JSON at the end, ``{"outcomes":
  {test id: outcome}, "apps": how many apps got our Session}``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import _pytest.monkeypatch
import flask
import pytest

# Flask 3.1's conftest uses ``_pytest.monkeypatch.notset``, which pytest 9 renamed NOTSET.
if not hasattr(_pytest.monkeypatch, "notset"):
    _pytest.monkeypatch.notset = _pytest.monkeypatch.NOTSET  # type: ignore[attr-defined]

_URL = os.environ.get("GX_FLASK_SUITE_STORE")
_CONFIG: dict[str, Any] = json.loads(os.environ.get("GX_FLASK_SUITE_CONFIG") or "{}")
_SKIP: dict[str, str] = json.loads(os.environ.get("GX_FLASK_SUITE_SKIP") or "{}")
_outcomes: dict[str, str] = {}
_store: Any = None
_apps = 0

if _URL:
    from flask.sessions import SecureCookieSessionInterface

    from gunicorn_ext.state.flask import Session
    from gunicorn_ext.state.store import open_store

    _flask_init = flask.Flask.__init__

    def _init_with_our_session(self: flask.Flask, *args: Any, **kwargs: Any) -> None:
        global _store, _apps
        _flask_init(self, *args, **kwargs)
        if type(self.session_interface) is not SecureCookieSessionInterface:
            return  # the test brings its own session interface: an app would keep it
        for key, value in _CONFIG.items():
            self.config.setdefault(key, value)
        if _store is None:
            _store = open_store(_URL)
        Session(self, store=_store)
        _apps += 1

    flask.Flask.__init__ = _init_with_our_session  # type: ignore[method-assign]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        reason = _SKIP.get(item.nodeid)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        if report.nodeid not in _outcomes or _outcomes[report.nodeid] == "passed":
            _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("GX_FLASK_SUITE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"outcomes": _outcomes, "apps": _apps}, f, indent=1, sort_keys=True)
    if _store is not None:
        _store.close()
