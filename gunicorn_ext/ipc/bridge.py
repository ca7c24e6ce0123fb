"""The bus bridge: publications across the instances of one cluster, through Redis.

With ``bus_bridge_url`` set, the hub of every instance hands each publication made
on it (by a worker or the primary) to its bridge, besides delivering it on the
instance as always: same-instance delivery never goes through Redis. The bridge
publishes it on the Redis channel ``gunicorn-ext:bus:<name>`` (``name`` is
``bus_bridge_name``, default Gunicorn's ``proc_name``), and delivers what the other
instances published there to this instance's subscribers, through the hub. Each
publication carries the id of the instance that made it, so an instance skips its
own: every subscriber gets each publication exactly once while the bridge is up.

One Redis connection per primary, however many workers: it speaks RESP3, where a
subscribed connection may still PUBLISH (Redis 6 or newer), and it is owned by one
thread, which waits on it and on a wake-up pipe. The one redis-py internal this
touches is ``Connection._sock``, to wait on that socket and the pipe together.

Bridge down (Redis unreachable, killed, a link cut: an unanswered PING within
:data:`HEALTH_INTERVAL` s counts): local delivery goes on; each cross-instance
publication made meanwhile is refused, and its sender told (a worker gets a
:class:`~gunicorn_ext.ipc.errors.BridgeDown` notice, to its ``on_error`` callbacks;
``primary.publish`` raises it); one log line at loss, one at recovery; the bridge
reconnects by itself (0.5 s, doubling to 5 s). Nothing is buffered across an
outage: pub/sub keeps nothing either, so a buffer would only reorder and delay.
While up, at most :data:`MAX_OUTBOX` publications (or ``ipc_max_backlog`` bytes)
wait for Redis; beyond, a publication is refused the same way.

What comes from Redis is decoded against a typed schema and a size limit, like a
frame from a worker: a malformed one is dropped with a log line.

Fork safety: like the hub's, the thread is parked before every fork and resumed in
the parent; the child closes the bridge's descriptors without touching the
connection's session (redis-py shuts a socket down only in the process that opened
it), and never uses it.
"""

from __future__ import annotations

import collections
import select
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from ..extras import missing_extra
from ..forksafe import ForkParking
from .frames import ROUTING_SLACK

#: Prefix of the Redis channel of a cluster.
CHANNEL_PREFIX = "gunicorn-ext:bus:"
#: Publications that may wait for Redis while the bridge is up.
MAX_OUTBOX = 10000
#: Seconds of silence on the connection before a PING; as long again for its answer.
HEALTH_INTERVAL = 5.0
#: Reconnect delays (seconds): the first, and the most it doubles to.
RETRY_MIN, RETRY_MAX = 0.5, 5.0
#: Publications written to Redis in one batch.
_BATCH = 256


class Envelope(msgspec.Struct, array_like=True, tag="g1"):
    """One publication on the Redis channel (msgpack, as on the bus)."""

    origin: str
    topic: str
    src: int
    payload: Any = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)

#: deliver(topic, src, payload): a publication from another instance (bridge thread).
Deliver = Callable[[str, int, Any], None]
#: refused(src, topic, reason): a publication accepted earlier could not be sent.
Refused = Callable[[int, str, str], None]


class Bridge:
    """The primary's one connection to the other instances of its cluster.

    ``deliver`` and ``refused`` are called in the bridge thread; the hub passes
    functions that queue the work to its own thread.
    """

    def __init__(self, url: str, name: str, deliver: Deliver, refused: Refused, log: Any,
                 max_frame: int, max_backlog: int = 64 * 1024 * 1024,
                 health_interval: float = HEALTH_INTERVAL) -> None:
        try:
            from gunicorn_ext.state.redis import (  # type: ignore[import-not-found]
                RedisStore,
                redact_url,
            )
        except ImportError as exc:
            raise missing_extra(exc, "redis", "the bus bridge (bus_bridge_url)") from exc
        self.url = url
        self.safe_url = redact_url(url)
        # RESP3: the subscribed connection may still PUBLISH. No health checks of
        # redis-py's own (it would PING and read the answer itself): ours are below.
        # Nothing connects yet (a bad URL raises ValueError here, at startup).
        self._store = RedisStore(url, protocol=3, socket_timeout=health_interval,
                                 socket_connect_timeout=2.0, socket_keepalive=True,
                                 health_check_interval=0,
                                 client_name=f"gunicorn-ext-bridge:{name}"[:100])
        self.name = name
        self.channel = CHANNEL_PREFIX + name
        #: This instance's id on the channel (new at every start of the primary).
        self.origin = uuid.uuid4().hex
        self.log = log
        self.max_frame = max_frame
        self.max_backlog = max_backlog
        self.health_interval = health_interval
        self._deliver = deliver
        self._refused = refused
        #: Whether publications cross instances right now.
        self.up = False
        self._down_since = time.monotonic()
        self._down_reason = "not connected yet"
        self._lost_logged = False
        self.sent = self.received = self.refused = self.dropped = 0
        self._refused_in_outage = 0
        # (src, topic, data) waiting for Redis: appended by the hub thread, taken here.
        self._out: collections.deque[tuple[int, str, bytes]] = collections.deque()
        self._out_bytes = 0
        self._out_lock = threading.Lock()  # guards _out_bytes (both threads change it)
        self._pool: Any = None
        self._conn: Any = None
        self._running = False
        self._parking = ForkParking("bus bridge", after_child=self._after_fork_child)
        self._pipe = self._parking.pipe

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        # A connect in progress ends within socket_connect_timeout, before the park's limit.
        self._parking.start(self.log, self._run, "gunicorn-ext-bridge")

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._parking.stop()  # closes the wake-up pipe
        self._drop_conn()

    def status(self) -> dict[str, Any]:
        return {"url": self.safe_url, "channel": self.channel, "up": self.up,
                "down_reason": None if self.up else self._down_reason,
                "sent": self.sent, "received": self.received, "refused": self.refused,
                "dropped": self.dropped, "queued": len(self._out)}

    # ------------------------------------------------- hub side (hub thread)

    def forward(self, topic: str, src: int, payload: Any) -> str | None:
        """Queue a publication for the other instances; the reason when refused."""
        if not self.up:
            self.refused += 1
            self._refused_in_outage += 1
            return self.down_text(topic)
        if len(self._out) >= MAX_OUTBOX or self._out_bytes > self.max_backlog:
            self.refused += 1
            return (f"publication on {topic[:100]!r} reached this instance only: the bus bridge "
                    f"has {len(self._out)} publications waiting for Redis (limit {MAX_OUTBOX})")
        data = _encoder.encode(Envelope(self.origin, topic, src, payload))
        with self._out_lock:
            self._out_bytes += len(data)
        self._out.append((src, topic, data))
        self._pipe.wake()
        return None

    def down_text(self, topic: str) -> str:
        since = time.monotonic() - self._down_since
        return (f"publication on {topic[:100]!r} reached this instance only: the bus bridge to "
                f"{self.safe_url} is down ({since:.1f}s: {self._down_reason})")

    # ------------------------------------------------------ bridge thread

    def _run(self) -> None:
        delay = RETRY_MIN
        while self._running:
            if self._parking.requested:
                self._parking.park()
                continue
            if self._conn is None:
                try:
                    self._connect()
                except Exception as exc:
                    self._drop_conn()
                    self._set_down(_text(exc))
                    self._sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = RETRY_MIN
                self._set_up()
            try:
                self._serve()
            except Exception as exc:
                self._drop_conn()
                self._set_down(_text(exc))
        self.up = False

    def _sleep(self, seconds: float) -> None:
        """Wait, but wake for a fork (to park) or a stop."""
        end = time.monotonic() + seconds
        while self._running and not self._parking.requested:
            left = end - time.monotonic()
            if left <= 0:
                return
            select.select([self._pipe], [], [], left)
            self._pipe.drain()

    def _connect(self) -> None:
        client = self._store.client
        if self._store.kind == "cluster":  # classic pub/sub reaches every node of a cluster
            client = client.get_redis_connection(client.get_default_node())
        self._pool = client.connection_pool
        conn = self._pool.get_connection()
        self._conn = conn
        conn.send_command("SUBSCRIBE", self.channel)
        deadline = time.monotonic() + HEALTH_INTERVAL
        while True:
            if not conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError("no answer to SUBSCRIBE")
            resp = conn.read_response(push_request=True, disconnect_on_error=False)
            if isinstance(resp, list) and resp and _kind(resp) == "subscribe":
                return

    def _set_up(self) -> None:
        was_lost = self._lost_logged
        self.up = True
        if was_lost:
            self.log.info("gunicorn-ext: bus bridge to %s is back after %.1fs (%s publications "
                          "reached their own instance only meanwhile)", self.safe_url,
                          time.monotonic() - self._down_since, self._refused_in_outage)
        else:
            self.log.info("gunicorn-ext: bus bridge up: %s, channel %s", self.safe_url,
                          self.channel)
        self._lost_logged = False
        self._refused_in_outage = 0

    def _set_down(self, reason: str) -> None:
        if self.up or not self._lost_logged:
            self._down_since = time.monotonic()
            self.log.error("gunicorn-ext: bus bridge to %s is down (%s); publications reach "
                           "this instance only until it is back (reconnecting)",
                           self.safe_url, reason)
            self._lost_logged = True
        self.up = False
        self._down_reason = reason
        # What was waiting never left: tell each sender.
        while self._out:
            src, topic, data = self._out.popleft()
            with self._out_lock:
                self._out_bytes -= len(data)
            self.refused += 1
            self._refused(src, topic, f"publication on {topic[:100]!r} may have reached this "
                                      f"instance only: the bus bridge was lost ({reason})")

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:
                pass
            try:
                self._pool.release(conn)
            except Exception:
                pass

    def _serve(self) -> None:
        """Move publications both ways until the connection fails (raises)."""
        conn = self._conn
        sock = conn._sock  # redis-py internal: waited on together with the wake-up pipe
        last_rx = time.monotonic()
        ping_sent = 0.0
        while self._running and not self._parking.requested:
            if self._out:
                batch: list[tuple[str, str, bytes]] = []
                while self._out and len(batch) < _BATCH:
                    src, topic, data = self._out.popleft()
                    with self._out_lock:
                        self._out_bytes -= len(data)
                    batch.append(("PUBLISH", self.channel, data))
                conn.send_packed_command(conn.pack_commands(batch), check_health=False)
                self.sent += len(batch)
            now = time.monotonic()
            if ping_sent:
                wait = ping_sent + self.health_interval - now
            else:
                wait = last_rx + self.health_interval - now
            if wait <= 0:
                if ping_sent:
                    raise TimeoutError(f"no answer to PING within {self.health_interval:.0f}s")
                conn.send_command("PING", check_health=False)
                ping_sent = now
                continue
            if self._out:
                wait = 0.0
            readable, _, _ = select.select([sock, self._pipe], [], [], wait)
            if self._pipe in readable:
                self._pipe.drain()
            if sock in readable or conn.can_read(timeout=0):
                while True:
                    resp = conn.read_response(push_request=True, disconnect_on_error=False)
                    last_rx = time.monotonic()
                    if resp == b"PONG" or resp == "PONG":
                        ping_sent = 0.0
                    elif isinstance(resp, list):
                        if resp and _kind(resp) == "message" and len(resp) >= 3:
                            self._received(resp[2])
                    if not conn.can_read(timeout=0):
                        break

    def _received(self, data: Any) -> None:
        if not isinstance(data, bytes):
            self._drop(f"not bytes ({type(data).__name__})")
            return
        if len(data) > self.max_frame + ROUTING_SLACK:
            self._drop(f"{len(data)} bytes, over the bus limit of {self.max_frame} (ipc_max_frame)")
            return
        try:
            env = _decoder.decode(data)
        except msgspec.ValidationError as exc:
            self._drop(f"malformed ({exc})")
            return
        except msgspec.DecodeError as exc:
            self._drop(f"undecodable ({exc})")
            return
        except RecursionError:
            self._drop("nested too deeply to decode")
            return
        if env.origin == self.origin:
            return  # ours: delivered on this instance when it was made
        self.received += 1
        self._deliver(env.topic, env.src, env.payload)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self.log.warning("gunicorn-ext: dropped a publication from Redis channel %s: %s",
                         self.channel, why[:300])

    # -------------------------------------------------------- fork safety

    def _after_fork_child(self) -> None:
        """In a worker: close the bridge's descriptors (the parking closes the wake-up
        pipe); never use its connection."""
        self._running = False
        self._out.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect()  # closes only: redis-py shuts down sockets of its own pid
            except Exception:
                pass


def _kind(resp: list[Any]) -> str:
    head = resp[0]
    return head.decode("ascii", "replace") if isinstance(head, bytes) else str(head)


def _text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
