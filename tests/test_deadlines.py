"""Request deadlines (request_timeout, gunicorn_ext/deadlines.py) with real Gunicorn:
a request that hangs gets 503, its stack is logged, its worker is recycled and the slot
serves again; the worker's other requests finish."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import wait_for

APPS = Path(__file__).resolve().parent / "apps"


@pytest.mark.parametrize("worker_class", ["gthread", "sync"])
def test_hung_request_gets_503_and_its_worker_is_recycled(gunicorn_factory: Any,
                                                          worker_class: str) -> None:
    g = gunicorn_factory("hold_app:app", config=APPS / "hold_conf.py", cwd=APPS, workers=1,
                         env={"WORKER_CLASS": worker_class, "THREADS": "4", "WORKERS": "1",
                              "REQUEST_TIMEOUT": "1.5"}, health_path="/pid")
    (old,) = g.wait_workers(1)
    other: dict[str, Any] = {}
    if worker_class == "gthread":
        # Started just before the deadline of the hung one: it must still finish with 200.
        def short() -> None:
            time.sleep(1.0)
            other["r"] = requests.get(g.url("/hold?s=1.5"), timeout=15)

        t = threading.Thread(target=short)
        t.start()
    start = time.monotonic()
    r = requests.get(g.url("/hold?s=25"), timeout=15)
    took = time.monotonic() - start
    assert r.status_code == 503 and r.headers.get("Retry-After") == "1", (r.status_code, r.text)
    assert "deadline" in r.text
    assert took < 12, f"the hung request was answered only after {took:.1f}s"
    if worker_class == "gthread":
        t.join(timeout=20)
        assert other["r"].status_code == 200, "the worker's other request did not finish"
    wait_for(lambda: (pids := g.worker_pids()) and old not in pids, 20,
             what="the worker replaced")
    assert requests.get(g.url("/pid"), timeout=10).text != str(old)
    log = g.log_path.read_text()
    assert "request deadline: GET /hold?s=25 ran" in log
    assert "hold_app.py" in log and "time.sleep" in log, "the hung thread's stack is logged"


def test_no_deadline_by_default(gunicorn_factory: Any) -> None:
    g = gunicorn_factory("hold_app:app", config=APPS / "hold_conf.py", cwd=APPS, workers=1,
                         env={"WORKER_CLASS": "gthread", "THREADS": "2", "WORKERS": "1"},
                         health_path="/pid")
    (pid,) = g.wait_workers(1)
    assert requests.get(g.url("/hold?s=2.5"), timeout=15).status_code == 200
    assert g.worker_pids() == [pid]


class _Log:
    def __init__(self) -> None:
        self.critical_lines: list[str] = []

    def critical(self, msg: str, *args: Any) -> None:
        self.critical_lines.append(msg % args)

    def warning(self, msg: str, *args: Any) -> None:
        pass

    exception = warning


def test_an_expired_request_is_logged_as_it_came_in() -> None:
    """Unit level: the request path keeps references only (no lock, no formatting); the
    line in the log is the request as it arrived, even if middleware rewrote the environ."""
    from types import SimpleNamespace

    from gunicorn_ext.deadlines import Deadlines

    worker = type("ThreadWorker", (), {})()
    worker.cfg = SimpleNamespace(graceful_timeout=30)
    log, reasons, seen = _Log(), [], {}
    dl = Deadlines(5.0, worker, reasons.append, lambda: None, log)
    exits: list[bool] = []
    dl._exit = lambda: exits.append(True)  # type: ignore[method-assign]  # not os._exit here

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["PATH_INFO"] = "/rewritten"
        dl.check(time.monotonic() + 1.0)  # not yet due
        seen["before"] = (list(log.critical_lines), list(reasons))
        dl.check(time.monotonic() + 6.0)  # past the deadline, while in the app
        return [b""]

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/orig", "QUERY_STRING": "q=1"}
    dl.wrap(app)(environ, lambda *a: None)
    assert seen["before"] == ([], [])
    assert len(log.critical_lines) == 1 and "GET /orig?q=1 ran" in log.critical_lines[0]
    assert "test_an_expired_request_is_logged_as_it_came_in" in log.critical_lines[0]  # its stack
    assert reasons == ["request deadline: GET /orig?q=1 ran over request_timeout=5s"]
    assert exits == [True]  # no other request in flight: the worker would exit now
    dl.finished()
    assert dl._inflight == {}


@pytest.mark.parametrize("started", [False, True], ids=["before-start_response", "after"])
def test_an_expired_request_gets_503_only_if_nothing_was_sent(started: bool) -> None:
    """Unit level: 503 when the app had not called Gunicorn's start_response (read from
    its Response's status), else no bytes of ours; the connection is shut either way."""
    import socket
    from types import SimpleNamespace

    from gunicorn_ext.deadlines import Deadlines

    class Response:  # what Gunicorn's start_response is bound to
        status: str | None = None

        def start_response(self, status: str, headers: Any, exc_info: Any = None) -> None:
            self.status = status

    worker = type("ThreadWorker", (), {})()
    worker.cfg = SimpleNamespace(graceful_timeout=30)
    dl = Deadlines(5.0, worker, lambda reason: None, lambda: None, _Log())
    dl._exit = lambda: None  # type: ignore[method-assign]
    ours, client = socket.socketpair()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if started:
            start_response("200 OK", [])
        dl.check(time.monotonic() + 6.0)
        return [b""]

    try:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "gunicorn.socket": ours}
        dl.wrap(app)(environ, Response().start_response)
        client.settimeout(5)
        got = b""
        while chunk := client.recv(4096):
            got += chunk
        assert got.startswith(b"HTTP/1.1 503") != started, got
    finally:
        ours.close()
        client.close()


@pytest.mark.parametrize(("cookie", "pinned"), [
    (None, False), ("gx_route=r1", True), ("gx_route=r1; a=b", True), ("a=b; gx_route=r1", True),
    ("gx_route=other", False), ("gx_route=r1x", False), ("", False),
])
def test_a_route_cookie_inside_is_folded_in_unchanged(cookie: str | None, pinned: bool) -> None:
    """Unit level: the deadline wrapper runs a RouteCookie's pinned-client check inline;
    every request still gets what the cookie alone gives it (Set-Cookie unless pinned
    here, the environ marked as the cookie's) and is registered while in the app."""
    from types import SimpleNamespace

    from gunicorn_ext.deadlines import Deadlines
    from gunicorn_ext.sticky import ENVIRON_KEY, RouteCookie

    worker = type("ThreadWorker", (), {})()
    worker.cfg = SimpleNamespace(graceful_timeout=30)
    dl = Deadlines(5.0, worker, lambda reason: None, lambda: None, _Log())
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["inflight"] = len(dl._inflight)
        seen["marked"] = environ.get(ENVIRON_KEY)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    rc = RouteCookie(app, route="r1")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": ""}
    if cookie is not None:
        environ["HTTP_COOKIE"] = cookie
    headers: list[Any] = []
    body = dl.wrap(rc)(environ, lambda status, h, exc_info=None: headers.extend(h))
    dl.finished()
    assert list(body) == [b"ok"] and seen == {"inflight": 1, "marked": rc}
    set_cookie = [v for k, v in headers if k == "Set-Cookie"]
    assert set_cookie == ([] if pinned else ["gx_route=r1; Path=/; HttpOnly; SameSite=Lax"])
    assert dl._inflight == {}
