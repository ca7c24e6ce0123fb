"""Test app: sio_app's Flask-SocketIO app, pinned by the route cookie.

Each worker's ``RouteCookie`` names the worker's own per-worker port (``GX_ROUTE`` is
set by gunicorn-ext's ``post_fork`` before the app is imported), so nginx can keep a
long-polling client on the worker that holds its Engine.IO session.
"""

from __future__ import annotations

from sio_app import app, socketio

from gunicorn_ext.sticky import RouteCookie

app.wsgi_app = RouteCookie(app.wsgi_app)  # type: ignore[method-assign]

# A polling client's disconnect() waits for its pending long-poll GET, which python-engineio
# sometimes answers only with the next ping (25 s by default, also without nginx): ping
# often so sequential sessions are not held up by it.
socketio.server.eio.ping_interval = 1

__all__ = ["app", "socketio"]
