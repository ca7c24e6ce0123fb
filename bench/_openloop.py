"""An open-loop HTTP load generator: requests at a fixed rate, whatever the server does.

A helper module of the benchmarks (the leading underscore keeps ``make bench`` from
running it). wrk is closed-loop (a slow server slows the load and hides its queueing);
here request *i* is due at ``start + i / rate`` and its latency is measured from that due
time, so time spent queued behind a busy worker counts (no coordinated omission).

Two connection modes: ``keepalive=False`` opens a new connection per request
(``Connection: close``); ``keepalive=True`` reuses idle connections from a pool and
opens another only when none is idle (bounded by *max_connections*). A server that
closes after each response (Gunicorn's sync worker) makes both modes alike.

The body of each response is taken as the name of the worker that served it (the
benchmark apps answer with their pid).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import time
from dataclasses import dataclass, field
from typing import Any

REQUEST_TIMEOUT = 5.0


@dataclass
class Result:
    """What one run saw: latencies (seconds, from the due time), worker counts, errors."""

    rate: float
    seconds: float
    keepalive: bool
    latencies: list[float] = field(default_factory=list)
    workers: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    sent: int = 0
    late_dispatch: int = 0  # requests the generator itself started > 1 ms after their due time
    connections_opened: int = 0
    client_cpu_s: float = 0.0  # CPU time the generator itself used (it shares the machine)

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q / 100.0 * len(xs)))]

    def summary(self, workers: int | None = None) -> dict[str, Any]:
        """The run's figures. With *workers* (how many the server has), a worker that
        served nothing counts: max/min share is then the busiest worker's count over 1."""
        counts = sorted(self.workers.values())
        if workers is not None and len(counts) < workers:
            counts = [0] * (workers - len(counts)) + counts
        return {
            "rate": self.rate, "seconds": self.seconds, "keepalive": self.keepalive,
            "sent": self.sent, "ok": len(self.latencies), "errors": dict(self.errors),
            "achieved_rps": len(self.latencies) / self.seconds if self.seconds else 0.0,
            "p50_ms": _ms(self.percentile(50)), "p99_ms": _ms(self.percentile(99)),
            "p999_ms": _ms(self.percentile(99.9)),
            "per_worker": dict(self.workers),
            "max_min_share": (counts[-1] / max(1, counts[0])) if counts and counts[-1] else None,
            "idle_workers": sum(1 for c in counts if c == 0),
            "late_dispatch": self.late_dispatch,
            "connections_opened": self.connections_opened,
            "client_cpu_ms_per_request": (1000.0 * self.client_cpu_s / len(self.latencies)
                                          if self.latencies else None),
        }

    def arrivals(self) -> list[float]:
        """The due times of the requests sent, in seconds from the first: the schedule an
        ideal server would have been fed (request *i* at ``i / rate``)."""
        return [i / self.rate for i in range(self.sent)]


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server_keeps_connection) of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    keep = lines[0].startswith("HTTP/1.1")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection":
            keep = value.strip().lower() != "close"
    body = await (reader.readexactly(length) if length is not None else reader.read())
    return status, body, keep and length is not None


class _Pool:
    def __init__(self, host: str, port: int, keepalive: bool, max_connections: int,
                 result: Result) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self.idle: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            collections.deque())
        self.open = 0
        self.max = max_connections
        self.result = result
        self.request = (f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        f"Connection: {'keep-alive' if keepalive else 'close'}\r\n\r\n").encode()

    async def one(self, due: float) -> None:
        conn = self.idle.pop() if (self.keepalive and self.idle) else None
        try:
            if conn is None:
                if self.open >= self.max:
                    self.result.errors["client_connection_cap"] += 1
                    return
                self.open += 1
                self.result.connections_opened += 1
                try:
                    conn = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), REQUEST_TIMEOUT)
                except BaseException:
                    self.open -= 1
                    raise
            reader, writer = conn
            writer.write(self.request)
            status, body, keep = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                IndexError) as exc:
            self.result.errors[type(exc).__name__] += 1
            if conn is not None:
                self._close(conn)
            return
        done = time.monotonic()
        if status == 200:
            self.result.latencies.append(done - due)
            self.result.workers[body.decode("latin-1", "replace")] += 1
        else:
            self.result.errors[f"http_{status}"] += 1
        if self.keepalive and keep:
            self.idle.append(conn)
        else:
            self._close(conn)

    def _close(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.open -= 1
        conn[1].close()

    def close_all(self) -> None:
        while self.idle:
            self._close(self.idle.pop())


async def _run(host: str, port: int, rate: float, seconds: float, keepalive: bool,
               max_connections: int) -> Result:
    result = Result(rate=rate, seconds=seconds, keepalive=keepalive)
    pool = _Pool(host, port, keepalive, max_connections, result)
    tasks: set[asyncio.Task[None]] = set()
    cpu_start = time.process_time()
    interval = 1.0 / rate
    total = int(rate * seconds)
    start = time.monotonic() + 0.05
    for i in range(total):
        due = start + i * interval
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            result.late_dispatch += 1
        task = asyncio.ensure_future(pool.one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        result.sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 1)
    for task in list(tasks):
        task.cancel()
    pool.close_all()
    result.client_cpu_s = time.process_time() - cpu_start
    return result


def fcfs(arrivals: list[float], occupancy: float, servers: int) -> list[float]:
    """The waits of an ideal first-come-first-served queue with *servers* servers fed
    *arrivals* (seconds, sorted), each request holding a server for *occupancy* seconds:
    no scheduler, GIL or context switch adds to that."""
    free = [0.0] * servers  # when each server is next free (a heap)
    out = []
    for t in arrivals:
        start = max(t, free[0])
        heapq.heapreplace(free, start + occupancy)
        out.append(start - t)
    return out


def run(host: str, port: int, rate: float, seconds: float, keepalive: bool,
        max_connections: int = 512) -> Result:
    """Send ``rate * seconds`` GET / requests at *rate* per second; bounded in count and time."""
    if not (0 < rate <= 50_000 and 0 < seconds <= 120):
        raise ValueError(f"rate {rate} or seconds {seconds} out of bounds")
    return asyncio.run(_run(host, port, rate, seconds, keepalive, max_connections))


async def _closed(host: str, port: int, seconds: float, connections: int,
                  keepalive: bool) -> int:
    result = Result(rate=0, seconds=seconds, keepalive=keepalive)
    pool = _Pool(host, port, keepalive, connections, result)
    end = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < end:
            await pool.one(time.monotonic())

    await asyncio.gather(*(loop() for _ in range(connections)))
    pool.close_all()
    return len(result.latencies)


def capacity(host: str, port: int, seconds: float = 4.0, connections: int = 16,
             keepalive: bool = True) -> float:
    """Closed-loop throughput (req/s) with *connections* busy clients: the saturation point
    (*keepalive* False: a new connection per request)."""
    if not (0 < seconds <= 60 and 0 < connections <= 512):
        raise ValueError(f"seconds {seconds} or connections {connections} out of bounds")
    n = asyncio.run(_closed(host, port, seconds, connections, keepalive))
    return n / seconds
