"""The worker reporter's per-request work (gunicorn_ext/reporter.py), unit level: the RSS
read it does after requests when memory_soft_limit is set (at most every RSS_CHECK_GAP), across a fork, and the
recycle it triggers. The whole path with real Gunicorn is in test_lifecycle.py."""

from __future__ import annotations

import logging
import os
import time
import types
from typing import Any

import psutil

from gunicorn_ext.ipc.bus import Bus
from gunicorn_ext.reporter import Reporter, current_rss
from gunicorn_ext.settings import Settings

MIB = 1 << 20


def test_current_rss_is_this_process_s_even_after_a_fork() -> None:
    before = current_rss()  # opens the kept descriptor in this (the parent) process
    assert abs(before - psutil.Process().memory_info().rss) < 16 * MIB
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: grow by 64 MiB; its reading must show it, not the parent's
        try:
            ballast = bytearray(64 * MIB)
            for i in range(0, len(ballast), 4096):
                ballast[i] = 1
            os.write(w, f"{current_rss()} {psutil.Process().memory_info().rss}".encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode().split()
    os.close(r)
    os.waitpid(pid, 0)
    child, child_psutil = int(got[0]), int(got[1])
    assert abs(child - child_psutil) < 16 * MIB
    assert child > before + 48 * MIB
    assert current_rss() < child - 48 * MIB  # the parent's own descriptor still reads its own


class _Recorder(Reporter):
    """A reporter whose recycles are recorded, with one request at a time run through
    the WSGI request hooks' real bodies (gunicorn_ext.hooks._request_hooks)."""

    def __init__(self, limit: int) -> None:
        import gunicorn_ext.hooks as hooks

        super().__init__(Bus(), Settings(memory_soft_limit=limit), logging.getLogger("t"))
        self.reasons: list[str] = []
        saved = hooks.reporter, hooks.deadlines, hooks.dispatched_listener
        hooks.reporter, hooks.deadlines, hooks.dispatched_listener = self, None, None
        try:
            self._pre, self._post = hooks._request_hooks(types.SimpleNamespace(alive=True))
        finally:
            hooks.reporter, hooks.deadlines, hooks.dispatched_listener = saved
        self._req: Any = None

    def pre_request(self) -> None:
        self._req = types.SimpleNamespace()  # Gunicorn's req: the same object for both hooks
        self._pre(None, self._req)

    def post_request(self) -> None:
        self._post(None, self._req, {}, None)

    def recycle(self, reason: str) -> None:
        self.reasons.append(reason)
        self._exiting = True


def test_a_request_over_the_soft_limit_recycles_and_one_under_does_not() -> None:
    under = _Recorder(current_rss() + 512 * MIB)
    under.pre_request()
    under.post_request()
    assert under.reasons == [] and under.stats.requests == 1 and under.stats.inflight == 0
    over = _Recorder(1 * MIB)
    for _ in range(3):
        over.pre_request()
        over.post_request()
    assert len(over.reasons) == 1 and "memory_soft_limit 1 MiB" in over.reasons[0]
    assert over.stats.requests == 3  # counted all the same


def test_no_limit_reads_no_rss(monkeypatch: Any) -> None:
    import gunicorn_ext.reporter as reporter

    def boom() -> int:
        raise AssertionError("read RSS with memory_soft_limit=0")

    monkeypatch.setattr(reporter._STATM, "rss", boom)
    rep = _Recorder(0)
    rep.pre_request()
    rep.post_request()
    assert rep.stats.requests == 1


def test_requests_read_rss_at_most_every_gap_and_the_first_after_a_pause_always(
        monkeypatch: Any) -> None:
    import gunicorn_ext.reporter as reporter

    reads: list[int] = []

    def rss() -> int:
        reads.append(1)
        return 2 * MIB

    monkeypatch.setattr(reporter._STATM, "rss", rss)
    rep = _Recorder(1 * MIB)
    rep._exiting = False
    t = time.perf_counter() - 5.0  # seconds ago on the real clock
    for i in range(100):  # a burst: 100 requests within 10 ms
        rep.request_finished(0.0001, t + i * 0.0001)
        rep._exiting = False  # keep checking (a real recycle stops the checks)
    assert len(reads) == 1 and len(rep.reasons) == 1  # the first one read; the others did not
    rep.request_finished(0.0001, t + reporter.RSS_CHECK_GAP + 0.001)  # after the gap: read
    assert len(reads) == 2 and rep.stats.requests == 101
    reads.clear()
    rep._exiting = False
    rep.pre_request()  # the real clock, long after: the next request is checked at once
    rep.post_request()
    assert len(reads) == 1


def test_asgi_middleware_counts_pins_and_checks_memory_in_one_layer(monkeypatch: Any) -> None:
    import asyncio
    import inspect

    import gunicorn_ext.reporter as reporter
    from gunicorn_ext.asgi import ClusterMiddleware
    from gunicorn_ext.sticky import AsgiRouteCookie

    reads: list[int] = []

    def rss() -> int:
        reads.append(1)
        return 2 * MIB

    monkeypatch.setattr(reporter._STATM, "rss", rss)
    calls: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    rep = _Recorder(1 * MIB)
    mw = ClusterMiddleware(AsgiRouteCookie(app, route="a"), Bus(), rep)
    assert mw.cookie is not None and mw._inner is app  # the cookie's layer is folded in

    def call(cookie: bytes | None) -> list[Any]:
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request"}

        async def send(message: Any) -> None:
            sent.append(message)

        headers = [(b"cookie", cookie)] if cookie is not None else []
        asyncio.run(mw({"type": "http", "path": "/", "scheme": "http", "headers": headers},
                       receive, send))
        return list(sent[0]["headers"])

    assert call(None) == [(b"set-cookie", b"gx_route=a; Path=/; HttpOnly; SameSite=Lax")]
    assert call(b"gx_route=a") == []  # pinned here: no Set-Cookie
    assert call(b"gx_route=b") == [(b"set-cookie", b"gx_route=a; Path=/; HttpOnly; SameSite=Lax")]
    assert call(b"gx_route=a; x=1") == [] and call(b"x=1; gx_route=a") == []  # not alone
    assert call(b"x=1; gx_route=b") == [(b"set-cookie", b"gx_route=a; Path=/; HttpOnly; SameSite=Lax")]
    assert len(calls) == 6 and rep.stats.requests == 6 and rep.stats.inflight == 0
    # The hooks install a plain coroutine function (uvicorn takes a bound method for ASGI2).
    assert inspect.iscoroutinefunction(mw.asgi) and not inspect.ismethod(mw.asgi)
    assert len(reads) == 1 and len(rep.reasons) == 1  # checked after the first, then recycling
