"""A python-socketio client manager over the gunicorn-ext bus.

With several Gunicorn workers, each worker holds only the Socket.IO clients connected
to it, so an ``emit`` to everyone (or to a room) made in one worker would reach only
that worker's clients. python-socketio solves this with a pub/sub client manager
(:class:`socketio.PubSubManager`): each emit is handled locally and also published,
and every other server replays it to its own clients. :class:`BusManager` is such a
manager whose pub/sub is the gunicorn-ext bus, so the workers of one instance share
their clients with no Redis (or other broker) at all::

    from flask_socketio import SocketIO
    from gunicorn_ext.socketio import BusManager

    socketio = SocketIO(app, client_manager=BusManager())   # Flask-SocketIO
    sio = socketio.Server(client_manager=BusManager())      # plain python-socketio

Limits, honestly:

* The bus spans one Gunicorn instance (one arbiter and its workers), and every
  instance of the cluster when the bus bridge is on (``bus_bridge_url``): each
  primary then holds one Redis connection, however many workers, and an emit
  reaches the other workers of its own instance without touching Redis. Each
  client gets each message once (python-socketio skips its own publications by
  ``host_id``). While the bridge is down, emits reach this instance only, and each
  worker's bus logs the refusal. (python-socketio's ``socketio.RedisManager`` also
  spans instances, at one Redis connection per worker, and sends every emit through Redis.)
* It works in gunicorn-ext workers only; a ``write_only`` manager in an outside
  process has no bus (publishing logs an error, as RedisManager does when Redis is down).
* Socket.IO's long-polling transport needs every request of a session to reach the
  same worker, which a plain multi-worker Gunicorn bind does not give: use the
  websocket transport only, or per-worker ports (``worker_ports_base``) behind nginx
  with sticky routing (README, section 3).
* Publications are msgpack over the bus; python-socketio's pubsub messages are dicts
  of plain JSON types (binary attachments already base64-encoded by the base class),
  so they travel as they are. Tuples arrive as lists, which the base class accepts.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from .extras import missing_extra

try:
    import socketio
except ImportError as exc:
    raise missing_extra(exc, "socketio", __name__) from exc

from .ipc import IPCError, Message
from .ipc.bus import worker

__all__ = ["BusManager"]


class BusManager(socketio.PubSubManager):
    """Share Socket.IO clients between the workers of one instance (of every instance,
    with the bus bridge) through the bus.

    :param channel: the bus topic the workers publish on and subscribe to
        (default ``"socketio"``); use a distinct one per Socket.IO server in the app.
    :param write_only: as in :class:`socketio.PubSubManager`: emit only, never listen.
    :param logger: as in :class:`socketio.PubSubManager`.

    Publications are received on the bus listener thread, which only puts them in a
    queue; python-socketio's own pubsub thread (started at the server's first
    connection, via ``start_background_task``) takes them from it and emits them to
    this worker's clients, so a slow client never holds the bus listener up.
    """

    name = "gunicorn-ext-bus"

    def __init__(self, channel: str = "socketio", write_only: bool = False,
                 logger: Any = None) -> None:
        super().__init__(channel=channel, write_only=write_only, logger=logger)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._subscribed = False
        self._sub_lock = threading.Lock()

    def _publish(self, data: Any) -> None:
        try:
            worker.publish(self.channel, data)
        except IPCError as exc:
            self._get_logger().error("Cannot publish on the gunicorn-ext bus: %s", exc)

    def _subscribe(self) -> None:
        # Once per manager. Before the bus is attached (at import with preload_app)
        # the bus keeps the subscription and sends it when the worker attaches;
        # after, it is sent at once.
        with self._sub_lock:
            if self._subscribed:
                return
            self._subscribed = True

            @worker.subscribe(self.channel)
            def _received(msg: Message) -> None:
                self._queue.put(msg.payload)

    def _listen(self) -> Iterator[Any]:
        self._subscribe()
        while True:
            yield self._queue.get()
