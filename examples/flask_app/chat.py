"""The example's real-time part: a WebSocket chat at ``/ws`` and a Socket.IO namespace ``/chat``.

``GET /chat`` is a chat page for browsers (``templates/chat.html``, ``static/chat.js``),
on the namespace ``/chat`` with the Socket.IO JavaScript client served from ``static/``
(vendored, no build step, no CDN).

Each worker holds only the clients connected to it, so a message a client sends must
be fanned out to every worker (and every instance) before each worker hands it to its
own clients. Which road it takes depends on the shared state (``CHAT_URL``, else
``STATE_URL``):

* a Redis URL (``redis://``, ``rediss://``, ``unix://``): Redis pub/sub carries every
  message, within an instance and across instances. The raw chat publishes with
  redis-py and reads with one subscriber thread per worker (started by the worker's
  first chat client, reconnecting with a log line when Redis goes away). Socket.IO uses
  :class:`gunicorn_ext.socketio.BusManager` over the gunicorn-ext bus bridge
  (``BUS_BRIDGE_URL``, which ``cluster_conf.py`` sets to a Redis ``STATE_URL``): one
  Redis connection per instance, none per worker, and same-instance emits never
  touch Redis; without the bridge (``BUS_BRIDGE_URL=off``), python-socketio's own
  :class:`socketio.RedisManager`. Pub/sub keeps nothing: a message published while
  a worker (or, with the bridge, its instance) is cut off from Redis does not reach
  its clients;
* anything else (the SQLite default, ``memory://``, or ``CHAT_URL=bus``): the
  gunicorn-ext bus, which spans the workers of one instance and needs no server. The
  raw chat publishes on a bus topic; Socket.IO uses
  :class:`gunicorn_ext.socketio.BusManager`.

``redis+sentinel://`` and ``redis+cluster://`` state URLs are not used for chat: the
state store reads sentinel URLs as ``/service[/db]`` but python-socketio as
``/db/service``, and python-socketio has no cluster support. With one of those, set
``CHAT_URL`` to a plain ``redis://`` URL (or ``CHAT_URL=bus`` for one instance); the
app refuses to start otherwise rather than chat on one instance only without saying so.
Pub/sub channels are global to a Redis server (not per database): apps sharing one
server need distinct :data:`CHANNEL` and :data:`SOCKETIO_CHANNEL` names.

Each message reaches each client once: a worker never hands a message it sends to its
own clients directly, it waits for it to come back from Redis or the bus, which deliver
a publication to every subscriber, the publisher included. (python-socketio's managers
do it the other way round: the sender emits locally and every receiver skips its own
publications, by ``host_id``.)

The raw protocol: text frames holding JSON objects. On connect the server sends
``{"type": "hello", "slot", "pid", "instance"}``; a client sends ``{"text": "..."}``
and every chat client receives ``{"type": "message", "id", "text", "slot", "pid",
"instance", "time"}`` naming the worker that took it. Bad input (a binary frame, not
JSON, not an object, no non-empty string ``text``, more than :data:`MAX_MESSAGE` bytes)
gets ``{"type": "error", "error": "..."}`` back to that client only and is never
broadcast; a frame over :data:`MAX_FRAME` bytes closes the connection (code 1009).

Threads: with Gunicorn's gthread worker, an open WebSocket (``/ws``, or Socket.IO's
websocket transport) holds one of the worker's ``threads`` for as long as it lasts, and
simple-websocket adds a reader thread of its own. ``/ws`` takes at most
``CHAT_MAX_CLIENTS`` clients per worker (default half of ``THREADS``) and answers 503
beyond, so plain requests keep threads to run on. With ``WORKER_CLASS=gevent`` threads
are greenlets (Socket.IO runs with ``async_mode="gevent"``), so the cap only keeps a
worker's share fair. The sync worker cannot hold a WebSocket (``/ws`` answers 503 there). Each client is written to by its own request
thread from its own queue: a slow client never holds up the bus listener, the Redis
subscriber or the other clients; one that falls :data:`MAX_BACKLOG` messages behind is
disconnected (code 1008). A worker told to stop (TERM, QUIT, INT) closes its raw
clients at once with code 1001 (reconnect), and its Socket.IO clients' transports
(they reconnect by themselves), rather than wait ``graceful_timeout`` for them.

Browsers are held to python-engineio's default origin rule (the ``Origin`` header must
match the request's host), on ``/ws`` and Socket.IO alike; ``CHAT_ALLOWED_ORIGINS``
(comma-separated, or ``*``) adds others, e.g. the public origin of an nginx listening
on a port other than 80/443 (nginx passes ``Host`` without the port).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import redis
import simple_websocket
import socketio
from flask import Flask, Response, jsonify, render_template, request
from flask_socketio import SocketIO, emit
from redis.backoff import NoBackoff
from redis.retry import Retry

import gunicorn_ext
from gunicorn_ext import worker
from gunicorn_ext.socketio import BusManager, async_mode

__all__ = ["Chat", "BadMessage", "MAX_MESSAGE", "init_app", "parse_message"]

log = logging.getLogger("gunicorn.error.chat")

#: Largest chat message a client may send, in bytes of its frame (UTF-8).
MAX_MESSAGE = 4096
#: Frames larger than this are not even read: the connection is closed (1009).
MAX_FRAME = 64 * 1024
#: Messages waiting for one slow client before it is disconnected.
MAX_BACKLOG = 1000
#: Seconds between pings to each raw client; an unanswered ping closes the connection.
PING_INTERVAL = 25
#: Seconds a closed client has to answer the close frame before its socket is shut.
CLOSE_WAIT = 2.0
#: Bus topic or Redis channel of the raw chat, and the Socket.IO manager's channel.
CHANNEL = "gunicorn-ext-example:chat"
SOCKETIO_CHANNEL = "gunicorn-ext-example:socketio"
NAMESPACE = "/chat"
REDIS_SCHEMES = ("redis", "rediss", "unix")
UNSUPPORTED_SCHEMES = ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")

Payload = dict[str, Any]


class BadMessage(ValueError):
    """What a client sent is not a chat message; the text is sent back to it."""


def parse_message(data: str | bytes) -> str:
    """Return the text of one raw chat frame, or raise :class:`BadMessage` saying why not."""
    if isinstance(data, bytes):
        raise BadMessage('expected a text frame holding a JSON object {"text": "..."}')
    size = len(data.encode("utf-8", "surrogatepass"))
    if size > MAX_MESSAGE:
        raise BadMessage(f"message too large: {size} bytes, at most {MAX_MESSAGE}")
    try:
        body = json.loads(data)
    except ValueError:
        raise BadMessage('not JSON: expected a JSON object {"text": "..."}')
    return _text_of(body)


def _text_of(body: Any) -> str:
    if not isinstance(body, dict):
        raise BadMessage('expected a JSON object {"text": "..."}')
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadMessage('expected a non-empty string "text"')
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MESSAGE:
        raise BadMessage(f"text too large: at most {MAX_MESSAGE} bytes")
    return text


def _is_message(payload: Any) -> bool:
    """True for a well-formed chat message (what comes back from Redis or the bus)."""
    return (isinstance(payload, dict) and payload.get("type") == "message"
            and isinstance(payload.get("id"), str) and isinstance(payload.get("text"), str)
            and isinstance(payload.get("slot"), int) and isinstance(payload.get("instance"), str))


def chat_url(state_url: str) -> str | None:
    """The Redis URL the chat fans out through, or None for the bus.

    ``CHAT_URL`` wins over *state_url*; ``CHAT_URL=bus`` forces the bus.
    Raises :class:`ValueError` for a Redis URL python-socketio cannot use.
    """
    explicit = os.environ.get("CHAT_URL", "").strip()
    url = explicit or state_url
    if url == "bus":
        return None
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        return url
    if scheme in UNSUPPORTED_SCHEMES:
        where = "CHAT_URL" if explicit else "STATE_URL"
        raise ValueError(
            f"chat: {where} is a {scheme}:// URL, which the chat cannot fan out through "
            "(python-socketio reads sentinel URLs differently and has no cluster support); "
            "set CHAT_URL=redis://host:port/0 (or CHAT_URL=bus for a single instance)")
    if explicit:
        raise ValueError(f"chat: CHAT_URL must be redis://, rediss://, unix:// or 'bus', "
                         f"not {scheme or url!r}")
    return None


def _safe(url: str) -> str:
    """*url* without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# ----------------------------------------------------------------------------- fan-out


class BusFanout:
    """Within one instance, over the gunicorn-ext bus (no server needed).

    The hub routes a publication to every worker subscribed to the topic, the
    publisher included, so each worker (the sender's too) delivers it once when it
    arrives. The subscription is made at import, which is in the worker (or in the
    arbiter with ``preload_app``: the bus sends it when the worker attaches).
    """

    name = "bus"

    def __init__(self, deliver: Callable[[Payload], None], topic: str = CHANNEL) -> None:
        self.topic = topic
        self._deliver = deliver
        worker.subscribe(topic)(self._received)

    def start(self, timeout: float) -> bool:
        return worker.connected

    def publish(self, payload: Payload) -> None:
        """Raises :class:`gunicorn_ext.IPCError` when this process has no bus."""
        worker.publish(self.topic, payload)

    def _received(self, msg: gunicorn_ext.Message) -> None:
        if _is_message(msg.payload):
            self._deliver(msg.payload)
        else:
            log.warning("chat: dropped a malformed publication on bus topic %r from slot %s",
                        self.topic, msg.src)


class RedisFanout:
    """Within and across instances, over Redis pub/sub.

    Redis delivers a publication to every subscribed connection, the publisher's own
    subscriber included, so as with the bus each worker delivers it once. Each worker
    has one subscriber thread, started by :meth:`start` (the worker's first chat
    client): a worker that never has a chat client never holds a subscription.
    """

    name = "redis"

    def __init__(self, url: str, deliver: Callable[[Payload], None],
                 channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self._deliver = deliver
        # Short timeouts and no retry loop: a publish to a dead Redis fails in seconds
        # and says so; the subscriber thread does its own reconnecting.
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=30,
            retry=Retry(NoBackoff(), 0))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._subscribed = threading.Event()

    def start(self, timeout: float) -> bool:
        """Start this worker's subscriber if needed; wait up to *timeout* s until it is
        subscribed (a message published before would not reach this worker)."""
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # not the arbiter's
                self._pid = os.getpid()
                self._subscribed.clear()
                self._thread = threading.Thread(target=self._run, name="chat-redis",
                                                daemon=True)
                self._thread.start()
        return self._subscribed.wait(timeout)

    def publish(self, payload: Payload) -> None:
        """Raises :class:`redis.RedisError` when Redis cannot be reached."""
        self._redis.publish(self.channel, json.dumps(payload))

    def _run(self) -> None:
        delay, lost = 0.5, False
        while True:
            pubsub = self._redis.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while True:
                    msg = pubsub.get_message(timeout=5.0)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        self._subscribed.set()
                        if lost:
                            log.info("chat: Redis pub/sub on %s is back (slot %s)",
                                        _safe(self.url), worker.slot)
                        delay, lost = 0.5, False
                    elif msg["type"] == "message":
                        self._received(msg["data"])
            except (redis.RedisError, OSError) as exc:
                self._subscribed.clear()
                log.error("chat: Redis pub/sub on %s lost (slot %s): %s; reconnecting in %.1fs",
                          _safe(self.url), worker.slot, exc, delay)
                lost = True
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                self._subscribed.clear()
                log.exception("chat: Redis subscriber failed; restarting in %.1fs", delay)
                time.sleep(delay)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _received(self, data: bytes) -> None:
        if len(data) > 2 * MAX_FRAME:
            log.warning("chat: dropped a %s-byte publication on Redis channel %r", len(data),
                        self.channel)
            return
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        if _is_message(payload):
            self._deliver(payload)
        else:
            log.warning("chat: dropped a malformed publication on Redis channel %r",
                        self.channel)


# ----------------------------------------------------------------------------- clients

class _Signal(enum.Enum):
    """Put in a client's queue beside the frames to send it."""

    WAKE = "look at the socket: a frame came in, or the connection ended"
    STOP = "the worker is stopping: close the connection"


class _WakeEvent(threading.Event):
    """simple-websocket sets its event when a frame arrives or the connection ends;
    this one also wakes the client's request thread, which waits on its queue."""

    def __init__(self, inbox: queue.SimpleQueue[str | _Signal]) -> None:
        super().__init__()
        self._inbox = inbox

    def set(self) -> None:
        super().set()
        self._inbox.put(_Signal.WAKE)


class _Client:
    """One raw WebSocket client: what is to be sent to it waits in its queue."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[str | _Signal] = queue.SimpleQueue()
        self.too_slow = False
        self.sock: socket.socket | None = None  # set once the handshake is done

    def make_event(self) -> threading.Event:
        return _WakeEvent(self.inbox)

    def push(self, frame: str) -> None:
        if self.too_slow:
            return
        if self.inbox.qsize() >= MAX_BACKLOG:
            self.too_slow = True
            self.inbox.put(_Signal.WAKE)
            # Its thread may be stuck in send() to a client that stopped reading, and
            # never see the signal: cut the connection if it hasn't gone by then.
            timer = threading.Timer(CLOSE_WAIT, self.abort)
            timer.daemon = True
            timer.start()
            return
        self.inbox.put(frame)

    def abort(self) -> None:
        """Shut the socket down: a send() blocked on a full buffer fails at once."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _finish(ws: simple_websocket.Server) -> None:
    """Close *ws* and make sure its reader thread ends.

    The reader ends when the client answers the close frame; one that never does
    (gone, or not reading) would keep it in ``recv`` (and the worker from exiting, since
    it is not a daemon thread), so after :data:`CLOSE_WAIT` seconds the socket is shut.
    """
    if ws.connected:
        try:
            ws.close()
        except (simple_websocket.ConnectionClosed, OSError):
            pass
    ws.thread.join(CLOSE_WAIT)
    if ws.thread.is_alive():
        try:
            ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        ws.thread.join(CLOSE_WAIT)


class _Closed(Response):
    """The response of a finished WebSocket: its connection no longer speaks HTTP.

    Under Gunicorn, ``StopIteration`` out of the WSGI app makes the worker drop the
    connection without writing anything (python-engineio does the same); Werkzeug's
    development server does so on ``ConnectionError``.
    """

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        if "gunicorn.socket" in environ:
            raise StopIteration()
        if "werkzeug.socket" in environ:
            raise ConnectionError("WebSocket closed")
        return []


# ----------------------------------------------------------------------------- the chat


class Chat:
    """The chat of one app, in one worker: its raw clients, the fan-out, Socket.IO."""

    def __init__(self, app: Flask, *, instance: str, state_url: str) -> None:
        self.instance = instance
        self.url = chat_url(state_url)
        #: The gunicorn-ext bus bridges instances (cluster_conf.py exports BUS_BRIDGE_URL).
        self.bridged = bool(os.environ.get("BUS_BRIDGE_URL", "").strip())
        self.max_clients = int(os.environ.get("CHAT_MAX_CLIENTS")
                               or max(1, int(os.environ.get("THREADS", "32")) // 2))
        self.allowed_origins = [o.strip() for o in
                                os.environ.get("CHAT_ALLOWED_ORIGINS", "").split(",") if o.strip()]
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._places = threading.BoundedSemaphore(self.max_clients)
        self._stopping = False

        manager: socketio.PubSubManager
        self.fanout: BusFanout | RedisFanout
        if self.url is None:
            self.fanout = BusFanout(self.deliver)
            manager = BusManager(channel=SOCKETIO_CHANNEL)
        else:
            self.fanout = RedisFanout(self.url, self.deliver)
            if self.bridged:  # the bus spans the instances: one Redis connection per primary
                manager = BusManager(channel=SOCKETIO_CHANNEL)
            else:
                manager = socketio.RedisManager(self.url, channel=SOCKETIO_CHANNEL,
                                                redis_options={"socket_connect_timeout": 2.0})
        # manage_session=False: Flask sessions are server-side already (gunicorn_ext.state.flask), and
        # a Socket.IO event should not load one it never reads. async_mode(): "gevent" under
        # WORKER_CLASS=gevent, "threading" under gthread (and sync).
        self.socketio = SocketIO(app, async_mode=async_mode(), client_manager=manager,
                                 cors_allowed_origins=("*" if "*" in self.allowed_origins
                                                       else self.origin_allowed),
                                 max_http_buffer_size=MAX_FRAME, manage_session=False)
        self.socketio.on_event("where", self.where, namespace=NAMESPACE)
        self.socketio.on_event("say", self.say, namespace=NAMESPACE)
        # Werkzeug routes an Upgrade: websocket request only to a websocket rule; the
        # plain rule answers anything else with a JSON 400.
        app.add_url_rule("/ws", "chat_ws", self.websocket, websocket=True)
        app.add_url_rule("/ws", "chat_ws_http", self.websocket)
        app.add_url_rule("/chat", "chat_page", self.page)
        app.extensions["gunicorn_ext_chat"] = self
        self._close_on_stop()

    def _close_on_stop(self) -> None:
        """Close this worker's clients as soon as it is told to stop.

        An open WebSocket is a request that never ends, so a stopping worker (TERM:
        shutdown, HUP, rolling reload, scale down, memory recycling) would otherwise wait
        Gunicorn's whole ``graceful_timeout`` and then be killed. The app is imported in
        the worker's main thread after Gunicorn set its signal handlers; ours wakes a
        thread that closes the clients, and runs Gunicorn's. Raw clients get code 1001
        (reconnect); Socket.IO clients lose their transport, and reconnect by themselves.
        Not with ``preload_app`` (the import is in the arbiter, whose handlers are not
        ours to wrap): the worker then waits for its WebSockets up to ``graceful_timeout``.
        """
        if not worker.connected or threading.current_thread() is not threading.main_thread():
            return
        stops: queue.SimpleQueue[int] = queue.SimpleQueue()  # put() is safe in a handler
        threading.Thread(target=self._close_all, args=(stops,), name="chat-stop",
                         daemon=True).start()
        for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def on_signal(num: int, frame: Any, previous: Callable[..., Any] = previous) -> None:
                stops.put(num)
                previous(num, frame)

            signal.signal(signum, on_signal)

    def _close_all(self, stops: queue.SimpleQueue[int]) -> None:
        stops.get()
        self._stopping = True  # also for a client still in its handshake (see _pump)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.inbox.put(_Signal.STOP)
        # This worker's Engine.IO sockets, each closed without waiting for its queue to
        # drain: eio.disconnect() waits, and can wait forever on a socket whose websocket
        # is closing at the same moment (its writer gone, a wake-up left in its queue).
        # abort=True: no CLOSE packet, which python-socketio's client takes as the server
        # disconnecting it for good (it never reconnects); a lost transport it reconnects
        # from. (gunicorn_ext.socketio.BusManager does the same on the stop.)
        sockets = list(self.socketio.server.eio.sockets.values())
        for sock in sockets:
            try:
                sock.close(wait=False, abort=True)
            except Exception:
                log.exception("chat: could not close a Socket.IO client of slot %s", worker.slot)
        log.info("chat: slot %s is stopping: closed %s WebSocket and %s Socket.IO client(s)",
                 worker.slot, len(clients), len(sockets))
        # A client thread stuck in send() (its client stopped reading) never sees STOP.
        time.sleep(CLOSE_WAIT)
        with self._lock:
            stuck = list(self._clients)
        for client in stuck:
            client.abort()

    # -- messages -------------------------------------------------------------------

    def message(self, text: str) -> Payload:
        """A chat message sent through this worker."""
        return {"type": "message", "id": uuid.uuid4().hex, "text": text, "slot": worker.slot,
                "pid": os.getpid(), "instance": self.instance, "time": round(time.time(), 3)}

    def deliver(self, payload: Payload) -> None:
        """Hand a message that came back from the fan-out to this worker's raw clients."""
        frame = json.dumps(payload)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.push(frame)

    # -- Socket.IO ------------------------------------------------------------------

    def where(self, *_: Any) -> Payload:
        """``where`` (acknowledged): the worker this client is connected to."""
        return {"slot": worker.slot, "pid": os.getpid(), "instance": self.instance}

    def say(self, *args: Any) -> Payload:
        """``say`` ``{"text": ...}``: ``said`` to every client of every worker.

        The acknowledgement is ``{"id": ...}``, or ``{"error": ...}`` for bad input
        (which is not broadcast).
        """
        try:
            text = _text_of(args[0] if args else None)
        except BadMessage as exc:
            return {"error": str(exc)}
        payload = self.message(text)
        emit("said", payload, broadcast=True, namespace=NAMESPACE)
        return {"id": payload["id"]}

    def page(self) -> str:
        """``GET /chat``: the chat page, a Socket.IO client of this namespace."""
        return render_template("chat.html")

    # -- the raw WebSocket ----------------------------------------------------------

    def websocket(self) -> Any:
        """``GET /ws``: one raw chat client, for as long as its connection lasts."""
        environ = request.environ
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return jsonify(error="expected a WebSocket upgrade (Upgrade: websocket)"), 400
        if not environ.get("wsgi.multithread"):
            return jsonify(error="the chat needs a threaded worker (gthread): "
                                 "a WebSocket holds a thread while it is open"), 503
        if not self.origin_allowed(environ.get("HTTP_ORIGIN"), environ):
            log.warning("chat: refused a WebSocket from origin %r", environ.get("HTTP_ORIGIN"))
            return jsonify(error="origin not allowed"), 403
        if not self._places.acquire(blocking=False):
            log.warning("chat: refused a WebSocket on slot %s: %s clients already",
                        worker.slot, self.max_clients)
            return jsonify(error="too many chat clients on this worker; retry later"), 503, {
                "Retry-After": "5"}
        try:
            self._serve(environ)
        finally:
            self._places.release()
        return _Closed()

    def _serve(self, environ: Any) -> None:
        client = _Client()
        try:
            ws = simple_websocket.Server.accept(
                environ, max_message_size=MAX_FRAME, ping_interval=PING_INTERVAL,
                event_class=client.make_event)
        except Exception as exc:
            log.warning("chat: WebSocket handshake failed: %s", exc)
            return
        client.sock = ws.sock
        with self._lock:
            self._clients.add(client)
        try:
            if not self.fanout.start(timeout=5.0):
                log.warning("chat: slot %s has a client but no %s subscription yet",
                            worker.slot, self.fanout.name)
            ws.send(json.dumps({"type": "hello", "slot": worker.slot, "pid": os.getpid(),
                                "instance": self.instance}))
            self._pump(ws, client)
        except (simple_websocket.ConnectionClosed, OSError):
            pass
        finally:
            with self._lock:
                self._clients.discard(client)
            _finish(ws)

    def _pump(self, ws: simple_websocket.Server, client: _Client) -> None:
        """Send what the client's queue holds, and handle what it sends, until it leaves."""
        while True:
            try:
                frame = client.inbox.get(timeout=1.0)
            except queue.Empty:
                # simple-websocket may wake us just before it marks the connection
                # closed (an oversized frame): look again now and then.
                if not ws.connected or not ws.thread.is_alive():
                    return
                if self._stopping:
                    client.inbox.put(_Signal.STOP)
                continue
            if isinstance(frame, str):
                ws.send(frame)
                continue
            if frame is _Signal.STOP:
                ws.close(1001, "server going away; reconnect")
                return
            if client.too_slow:
                log.warning("chat: disconnected a client of slot %s: %s messages behind",
                            worker.slot, MAX_BACKLOG)
                ws.close(1008, "too slow: messages were piling up")
                return
            while True:
                data = ws.receive(timeout=0)  # raises ConnectionClosed once it is gone
                if data is None:
                    break
                self._received(ws, data)
            if not ws.connected:
                return

    def _received(self, ws: simple_websocket.Server, data: str | bytes) -> None:
        try:
            text = parse_message(data)
        except BadMessage as exc:
            ws.send(json.dumps({"type": "error", "error": str(exc)}))
            return
        try:
            self.fanout.publish(self.message(text))
        except (gunicorn_ext.IPCError, redis.RedisError, OSError) as exc:
            log.error("chat: cannot publish a message from slot %s over %s: %s",
                      worker.slot, self.fanout.name, exc)
            ws.send(json.dumps({"type": "error", "error": "chat unavailable, not sent"}))

    def origin_allowed(self, origin: str | None, environ: Any) -> bool:
        """Whether a browser on *origin* may connect (``/ws`` and Socket.IO alike).

        python-engineio's default rule (no ``Origin``, i.e. not a browser; or the
        request's own scheme and host, or the forwarded ones), plus the origins listed in
        ``CHAT_ALLOWED_ORIGINS`` (``*``: any).
        """
        if not origin or origin in self.allowed_origins or "*" in self.allowed_origins:
            return True
        scheme, host = environ.get("wsgi.url_scheme", "http"), environ.get("HTTP_HOST", "")
        if origin == f"{scheme}://{host}":
            return True
        if "HTTP_X_FORWARDED_PROTO" in environ or "HTTP_X_FORWARDED_HOST" in environ:
            fscheme = environ.get("HTTP_X_FORWARDED_PROTO", scheme).split(",")[0].strip()
            fhost = environ.get("HTTP_X_FORWARDED_HOST", host).split(",")[0].strip()
            return bool(origin == f"{fscheme}://{fhost}")
        return False


def init_app(app: Flask, *, instance: str, state_url: str) -> Chat:
    """Add ``/ws`` and the Socket.IO namespace ``/chat`` to *app* (see the module docs)."""
    return Chat(app, instance=instance, state_url=state_url)
