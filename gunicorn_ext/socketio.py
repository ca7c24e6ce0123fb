"""python-socketio client managers over the gunicorn-ext bus.

With several Gunicorn workers, each worker holds only the Socket.IO clients connected
to it, so an ``emit`` to everyone (or to a room) made in one worker would reach only
that worker's clients. python-socketio solves this with a pub/sub client manager
(:class:`socketio.PubSubManager`, :class:`socketio.AsyncPubSubManager`): each emit is
handled locally and also published, and every other server replays it to its own
clients. :class:`BusManager` (WSGI: sync, gthread and gevent workers) and
:class:`AsyncBusManager` (ASGI: ``-k asgi``, ``uvicorn_worker.UvicornWorker``) are such
managers whose pub/sub is the gunicorn-ext bus, so the workers of one instance share
their clients with no Redis (or other broker) at all::

    from flask_socketio import SocketIO
    from gunicorn_ext.socketio import AsyncBusManager, BusManager, async_mode

    socketio = SocketIO(app, async_mode=async_mode(), client_manager=BusManager())
    sio = socketio.Server(async_mode=async_mode(), client_manager=BusManager())
    asio = socketio.AsyncServer(async_mode="asgi", client_manager=AsyncBusManager())

:func:`async_mode` is ``"gevent"`` in Gunicorn's gevent worker and ``"threading"``
elsewhere, so one app runs unchanged under ``-k gthread`` and ``-k gevent``
(Flask-SocketIO's own default would pick gevent whenever it is installed).

Limits, honestly:

* The bus spans one Gunicorn instance (one arbiter and its workers), and every
  instance of the cluster when the bus bridge is on (``bus_bridge_url``): each
  primary then holds one Redis connection, however many workers, and an emit
  reaches the other workers of its own instance without touching Redis. Each
  client gets each message once (python-socketio skips its own publications by
  ``host_id``). While the bridge is down, emits reach this instance only, and each
  worker's bus logs the refusal. (python-socketio's ``socketio.RedisManager`` also
  spans instances, at one Redis connection per worker, and sends every emit through Redis.)
* Both work in gunicorn-ext workers only; a ``write_only`` manager in an outside
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

import asyncio
import queue
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .extras import missing_extra

try:
    import socketio
    from socketio.async_pubsub_manager import AsyncPubSubManager  # not exported by socketio
except ImportError as exc:
    raise missing_extra(exc, "socketio", __name__) from exc

from .ipc import IPCError, Message
from .ipc.bus import worker
from .stopping import on_stop

__all__ = ["AsyncBusManager", "BusManager", "async_mode"]


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

    A graceful stop of the worker (TERM, rolling reload, ``max_requests``, memory
    recycling) closes this server's clients at once (:meth:`close_clients`, run by
    :func:`gunicorn_ext.stopping.on_stop`), instead of the worker waiting up to
    ``graceful_timeout`` for them; they reconnect by themselves, to another worker.
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

    def initialize(self) -> None:
        # Subscribed before the server's first client finishes connecting (not later, in
        # the pubsub thread), so what other workers emit once it is connected reaches it.
        super().initialize()
        on_stop(self.close_clients)
        if not self.write_only:
            self._subscribe()

    def close_clients(self) -> int:
        """End the transport of every client of this worker's server, so that each
        reconnects (to another worker, once this one stops listening); how many.

        ``close(abort=True)`` on each Engine.IO session (python-engineio's own close on a
        lost transport: a held long-poll gets an empty answer, a WebSocket is closed), not
        ``eio.disconnect()``: that sends a CLOSE packet, which python-socketio's client
        takes as "the server disconnected me" and never reconnects from. Socket.IO's
        disconnect handlers run as for any lost client (rooms left, ``disconnect`` called).
        """
        closed = 0
        for sock in list(self.server.eio.sockets.values()):
            if sock.closed:
                continue
            try:
                sock.close(wait=False, abort=True, reason=self.server.eio.reason.TRANSPORT_CLOSE)
            except Exception:
                self._get_logger().exception("Cannot close a Socket.IO client of this worker")
            closed += 1
        return closed

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


class AsyncBusManager(AsyncPubSubManager):
    """:class:`BusManager` for python-socketio's :class:`socketio.AsyncServer` (ASGI
    apps under ``-k asgi`` or ``uvicorn_worker.UvicornWorker``).

    Same parameters and limits as :class:`BusManager`. It publishes with
    ``await worker.apublish()`` (a local socket write: it never waits for the other
    workers) and subscribes with an ``async def`` subscriber, which the bus runs on the
    worker's event loop; the subscriber only puts each publication in an
    :class:`asyncio.Queue`, from which python-socketio's own pubsub task (started at the
    server's first connection) emits it to this worker's clients, in the order published.
    Nothing here blocks the loop.

    A graceful stop of the worker (TERM, rolling reload, ``max_requests``, memory
    recycling) closes this server's clients at once (:meth:`close_clients`, run by
    :func:`gunicorn_ext.stopping.on_stop`), instead of the worker waiting up to
    ``graceful_timeout`` for them; they reconnect by themselves, to another worker.
    """

    name = "gunicorn-ext-bus-async"

    def __init__(self, channel: str = "socketio", write_only: bool = False,
                 logger: Any = None) -> None:
        super().__init__(channel=channel, write_only=write_only, logger=logger)
        self._queue: asyncio.Queue[Any] | None = None

    async def _publish(self, data: Any) -> None:
        try:
            await worker.apublish(self.channel, data)
        except IPCError as exc:
            self._get_logger().error("Cannot publish on the gunicorn-ext bus: %s", exc)

    def initialize(self) -> None:
        # At the server's first connection, on its loop: subscribed before that client
        # finishes connecting, so what other workers emit once it is connected reaches it.
        super().initialize()
        on_stop(self.close_clients)
        if not self.write_only:
            try:
                self._subscribe()
            except RuntimeError:
                pass  # said by _listen, in the pubsub task

    async def close_clients(self) -> int:
        """End the transport of every client of this worker's server, so that each
        reconnects (to another worker, once this one stops listening); how many.

        Each Engine.IO session is closed as its own transport loss closes it (python-engineio's
        ``AsyncSocket.close(abort=True)``, then ``None`` in its queue, which ends a held
        long-poll with an empty answer and a WebSocket's writer, which closes it), not with
        ``eio.disconnect()``: that sends a CLOSE packet, which python-socketio's client takes
        as "the server disconnected me" and never reconnects from. Socket.IO's disconnect
        handlers run as for any lost client (rooms left, ``disconnect`` called).
        """
        eio = self.server.eio
        closed = 0
        for sock in list(eio.sockets.values()):
            if sock.closed:
                continue
            try:
                await sock.close(wait=False, abort=True,
                                 reason=eio.reason.TRANSPORT_CLOSE)
                sock.queue.put_nowait(None)  # python-engineio internal: wake its poll / writer
            except Exception:
                self._get_logger().exception("Cannot close a Socket.IO client of this worker")
            closed += 1
        return closed

    def _subscribe(self) -> asyncio.Queue[Any]:
        # Once per manager, on the loop that serves the clients.
        if self._queue is not None:
            return self._queue
        loop = asyncio.get_running_loop()
        if worker.connected and worker.loop is None:
            worker.bind_loop(loop)  # the hooks' middleware normally did it already
        if worker.loop is not None and worker.loop is not loop:
            # An async subscriber runs on the bus's loop; an asyncio.Queue is not
            # thread-safe, so a server on another loop would get nothing (or corrupt it).
            raise RuntimeError("AsyncBusManager: the Socket.IO server runs on another event "
                               "loop than the one the gunicorn-ext bus is bound to")
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._queue = q

        async def _received(msg: Message) -> None:  # on the bus's loop: this one
            q.put_nowait(msg.payload)

        worker.subscribe(self.channel)(_received)  # type: ignore[arg-type]  # async: the bus runs it on its loop

        return q

    async def _listen(self) -> AsyncIterator[Any]:  # type: ignore[override]
        try:
            q = self._subscribe()
        except RuntimeError as exc:
            # python-socketio's pubsub task would call _listen again at once, forever:
            # say it once, and wait here instead (emits still reach this worker's clients).
            self._get_logger().error("%s; this worker receives no other worker's emits", exc)
            await asyncio.Event().wait()
            return
        while True:
            yield await q.get()


def async_mode() -> str:
    """The python-socketio / Flask-SocketIO ``async_mode`` for this Gunicorn worker.

    ``"gevent"`` in a gevent-patched process (Gunicorn's gevent worker always patches,
    before it imports the app), ``"threading"`` otherwise (sync and gthread workers).
    With ``preload_app`` the app is imported in the arbiter, before any patching: this
    says ``"threading"`` there, which still works under gevent (its threads are greenlets
    once the worker patches), but ``async_mode="gevent"`` is then yours to pass.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        return "gevent"
    return "threading"
