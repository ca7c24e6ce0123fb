"""A bounded HTTP load for fault tests and benchmarks: client threads, every answer recorded.

Each client is a thread with its own ``requests.Session`` (keep-alive, and cookies kept
like a browser's: the Flask session and the ``gx_route`` pin), cycling over its paths.
Every request is recorded as a :class:`Result` (completion time, path, status or
transport error, ``Retry-After``, the example's ``/counter`` count), so a test can ask
what failed, when, and whether a session was lost. The load is bounded in time and
count; only loopback URLs are accepted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

__all__ = ["Load", "Result", "sessions_lost"]


@dataclass(frozen=True)
class Result:
    """One request: *t* seconds after the load started (at completion)."""

    t: float
    client: int
    path: str
    status: int  # 0: no HTTP answer (connection refused/reset, timeout)
    error: str = ""
    retry_after: str | None = None
    count: int | None = None  # /counter's session count on a 200

    @property
    def ok(self) -> bool:
        return self.status == 200


class Load:
    """*clients* threads requesting ``base + path`` for each of *paths* in turn.

    Runs from :meth:`start` until :meth:`stop`, *max_seconds* or *max_requests* (all
    clients together), whichever comes first. *pause* seconds between a client's
    requests keep a small machine from being saturated by the load alone.
    """

    def __init__(self, base: str, paths: Sequence[str], *, clients: int = 16,
                 max_seconds: float = 90.0, max_requests: int = 500_000,
                 timeout: float = 5.0, pause: float = 0.0) -> None:
        host = urlsplit(base).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"load only ever targets loopback, not {host!r}")
        self.base = base.rstrip("/")
        self.paths = list(paths)
        self.clients = clients
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.timeout = timeout
        self.pause = pause
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.t0 = 0.0

    def now(self) -> float:
        """Seconds since :meth:`start` (the time base of every :class:`Result`)."""
        return time.monotonic() - self.t0

    def start(self) -> Load:
        self.t0 = time.monotonic()
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self) -> list[Result]:
        """Stop every client (each finishes its request in flight); return the results."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        with self._lock:
            return sorted(self.results, key=lambda r: r.t)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, result: Result) -> bool:
        with self._lock:
            self.results.append(result)
            return len(self.results) < self.max_requests

    def _client(self, i: int) -> None:
        deadline = self.t0 + self.max_seconds
        n = i  # clients start at different paths
        with requests.Session() as s:
            while not self._stop.is_set() and time.monotonic() < deadline:
                path = self.paths[n % len(self.paths)]
                n += 1
                try:
                    r = s.get(self.base + path, timeout=self.timeout)
                except requests.RequestException as exc:
                    result = Result(self.now(), i, path, 0, type(exc).__name__)
                else:
                    count = None
                    if r.status_code == 200 and path.startswith("/counter"):
                        count = _count(r)
                    result = Result(self.now(), i, path, r.status_code,
                                    retry_after=r.headers.get("Retry-After"), count=count)
                if not self._record(result):
                    self._stop.set()
                if self.pause:
                    self._stop.wait(self.pause)


def _count(r: requests.Response) -> int | None:
    try:
        body: Any = r.json()
    except ValueError:
        return None
    value = body.get("count") if isinstance(body, dict) else None
    return value if isinstance(value, int) else None


def sessions_lost(results: Sequence[Result]) -> list[int]:
    """Clients whose ``/counter`` count did not go up at every 200 (their session was
    lost or rolled back). Each client is sequential, so its counts must increase."""
    last: dict[int, int] = {}
    lost: set[int] = set()
    for r in results:
        if r.count is None:
            continue
        if r.count <= last.get(r.client, 0):
            lost.add(r.client)
        last[r.client] = r.count
    return sorted(lost)
