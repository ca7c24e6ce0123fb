"""Every Gunicorn worker class with real Gunicorn: sync, gthread, gevent, the built-in
``asgi`` worker and ``uvicorn_worker.UvicornWorker``.

The lifecycle matrix runs the same checks for each class (life_app.py for the WSGI
classes, its ASGI twin life_asgi_app.py for the others); the async bus API is tested on
async_app.py under both asyncio workers, and the bus's cooperation under gevent on busapp.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, free_port_pair, wait_for

APPS = Path(__file__).parent / "apps"
LIFE_CONF = APPS / "life_conf.py"
BUS_CONF = APPS / "bus_conf.py"
CLI = str(Path(sys.executable).parent / "gunicorn-ext")

WSGI_CLASSES = ["sync", "gthread", "gevent"]
ASGI_CLASSES = ["asgi", "uvicorn_worker.UvicornWorker"]
ALL_CLASSES = WSGI_CLASSES + ASGI_CLASSES


def life(factory: Any, worker_class: str, workers: int = 1, **env: str) -> Gunicorn:
    app = "life_asgi_app:app" if worker_class in ASGI_CLASSES else "life_app:app"
    return factory(app, config=LIFE_CONF, cwd=APPS, workers=workers,  # type: ignore[no-any-return]
                   env={"WORKER_CLASS": worker_class, **env})


def get(g: Gunicorn, path: str = "/", timeout: float = 30, **kw: Any) -> dict[str, Any]:
    r = requests.get(g.url(path), headers={"Connection": "close"}, timeout=timeout, **kw)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def status(g: Gunicorn) -> dict[str, Any]:
    r = subprocess.run([CLI, "status", "--json"], env=g.env, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def wait_ready_slots(g: Gunicorn, n: int, exclude: frozenset[int] = frozenset(),
                     timeout: float = 30) -> dict[int, int]:
    def ok() -> dict[int, int] | None:
        s = {w["slot"]: w["pid"] for w in status(g)["workers"] if w["state"] == "ready"}
        return s if sorted(s) == list(range(n)) and not exclude & set(s.values()) else None

    return wait_for(ok, timeout, interval=0.1, what=f"{n} ready slots")  # type: ignore[no-any-return]


# -- the lifecycle, per worker class -------------------------------------------------------


@pytest.mark.parametrize("worker_class", ALL_CLASSES)
def test_metrics_count_every_request_per_slot(gunicorn_factory: Any, worker_class: str) -> None:
    g = life(gunicorn_factory, worker_class)
    wait_ready_slots(g, 1)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: get(g, "/slow?s=0.3"), range(4)))
    for _ in range(6):
        get(g, "/")

    # Every request counted and none left in flight, in one snapshot: the snapshot that
    # first shows 10 may be taken while the last request is still being answered (the
    # harness's readiness probe made one more), and it stands until the next report.
    def counted() -> dict[str, Any] | None:
        w = status(g)["workers"][0]
        return w if w["requests"] >= 10 and w["inflight"] == 0 else None

    wait_for(counted, 10, interval=0.2, what="10 requests counted, none in flight")


@pytest.mark.parametrize("worker_class", ALL_CLASSES)
def test_soft_memory_limit_recycles_after_the_request(gunicorn_factory: Any,
                                                      worker_class: str) -> None:
    g = life(gunicorn_factory, worker_class, MEMORY_SOFT="150M")
    first = wait_ready_slots(g, 1)
    assert get(g, "/leak?mb=200")["pid"] == first[0]  # the leaking request completes
    g.wait_log("recycling: RSS")
    again = wait_ready_slots(g, 1, exclude=frozenset(first.values()))
    assert get(g, "/")["pid"] == again[0]
    w = status(g)["workers"][0]
    assert w["last_exit"].startswith("recycled: RSS") and w["restarts"] == 1  # the exit note


@pytest.mark.parametrize("worker_class", ALL_CLASSES)
def test_max_lifetime_recycles(gunicorn_factory: Any, worker_class: str) -> None:
    g = life(gunicorn_factory, worker_class, workers=2, MAX_LIFETIME="1.5",
             MAX_LIFETIME_JITTER="0.5")
    first = wait_ready_slots(g, 2)
    wait_ready_slots(g, 2, exclude=frozenset(first.values()))
    assert "reached max_lifetime" in g.log_text()


@pytest.mark.parametrize("worker_class", ALL_CLASSES)
def test_rolling_reload_under_load_fails_no_request(gunicorn_factory: Any, tmp_path: Path,
                                                    worker_class: str) -> None:
    version = tmp_path / "VERSION"
    version.write_text("1")
    g = life(gunicorn_factory, worker_class, workers=2, APP_VERSION_FILE=str(version))
    before = wait_ready_slots(g, 2)
    ok, failed, versions = [0], [], set()
    stop = threading.Event()

    # The asyncio workers close idle keep-alive connections when they stop, so a client
    # reusing one at that instant sees a reset (an HTTP race nginx retries past): their
    # clients here open a connection per request.
    headers = {"Connection": "close"} if worker_class in ASGI_CLASSES else {}

    def load() -> None:
        s = requests.Session()
        end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < end and ok[0] < 20000:
            try:
                r = s.get(g.url("/"), timeout=10, headers=headers)
                r.raise_for_status()
                versions.add(r.json()["version"])
                ok[0] += 1
            except requests.RequestException as exc:
                failed.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        version.write_text("2")
        r = subprocess.run([CLI, "reload", "--rolling"], env=g.env, capture_output=True,
                           text=True, timeout=90, stdin=subprocess.DEVNULL)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert r.returncode == 0, r.stdout + r.stderr
    if worker_class == "uvicorn_worker.UvicornWorker":
        # uvicorn closes a connection it accepted but had not read yet when it stops (see
        # README, worker classes): such a request may be dropped, nothing else may fail.
        # The client sees no response: the connection closed, or reset when its request
        # was already in the socket (Linux answers a close with unread data with RST).
        dropped = ("RemoteDisconnected(", "ConnectionResetError(104,")
        assert len(failed) <= 3 and all(
            "Connection aborted." in f and any(d in f for d in dropped) for f in failed
        ), (failed, g.log_text_tail())
    else:
        assert failed == [], (failed, g.log_text_tail())
    assert ok[0] > 20
    assert versions == {"1", "2"}
    wait_ready_slots(g, 2, exclude=frozenset(before.values()))
    assert status(g)["rollout"]["state"] == "done"


@pytest.mark.parametrize("worker_class", ASGI_CLASSES)
def test_a_rollout_to_an_app_whose_startup_fails_keeps_every_old_worker(
        gunicorn_factory: Any, tmp_path: Path, worker_class: str) -> None:
    """An ASGI worker is ready once its app's lifespan startup completes, not when its
    server is set up: a deploy whose startup fails stops the rollout at its first new
    worker, and the old workers keep serving (ready at setup, each new worker had
    replaced an old one before failing, and the rollout went through every slot)."""
    version = tmp_path / "VERSION"
    version.write_text("1")
    g = life(gunicorn_factory, worker_class, workers=2, APP_VERSION_FILE=str(version))
    before = wait_ready_slots(g, 2)
    version.write_text("badstart")
    r = subprocess.run([CLI, "reload", "--rolling"], env=g.env, capture_output=True,
                       text=True, timeout=90, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "rollout stopped" in out, (out, g.log_text_tail())
    assert g.alive()
    assert wait_ready_slots(g, 2) == before
    assert {get(g, "/")["version"] for _ in range(6)} == {"1"}
    assert status(g)["rollout"]["state"] == "failed"


@pytest.mark.parametrize("worker_class", ALL_CLASSES)
def test_worker_ports_and_the_route_cookie(gunicorn_factory: Any, worker_class: str) -> None:
    base = free_port_pair()
    g = life(gunicorn_factory, worker_class, workers=2, WORKER_PORTS_BASE=str(base))
    slots = wait_ready_slots(g, 2)
    for slot in (0, 1):
        r = requests.get(f"http://127.0.0.1:{base + slot}/", timeout=10)
        assert r.json()["pid"] == slots[slot]  # the slot's own port reaches that worker
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"gx_route=127_0_0_1_{base + slot};")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        pinned = requests.get(f"http://127.0.0.1:{base + slot}/", timeout=10,
                              cookies={"gx_route": f"127_0_0_1_{base + slot}"})
        assert "set-cookie" not in pinned.headers  # already pinned here: no churn


@pytest.mark.parametrize("worker_class", ASGI_CLASSES)
def test_a_blocked_event_loop_has_its_stack_logged_before_the_kill(
        gunicorn_factory: Any, worker_class: str) -> None:
    g = life(gunicorn_factory, worker_class, TIMEOUT="4")
    first = wait_ready_slots(g, 1)
    try:  # the hung request is cut off when the arbiter kills the worker
        requests.get(g.url("/hang?s=60"), timeout=20)
    except requests.RequestException:
        pass
    g.wait_log("its event loop has not run for", timeout=20)
    log = g.log_text()
    assert "in block_the_loop" in log and "time.sleep(seconds)" in log
    wait_ready_slots(g, 1, exclude=frozenset(first.values()))


@pytest.mark.parametrize("worker_class", WSGI_CLASSES)
def test_request_deadline_answers_503_and_recycles(gunicorn_factory: Any,
                                                   worker_class: str) -> None:
    g = life(gunicorn_factory, worker_class, REQUEST_TIMEOUT="1")
    first = wait_ready_slots(g, 1)
    r = requests.get(g.url("/hang?s=30"), timeout=20)
    assert r.status_code == 503 and "deadline" in r.text
    g.wait_log("request deadline: GET /hang?s=30 ran")
    assert "in hang_here" in g.log_text()  # the request's own stack (a greenlet's, under gevent)
    wait_ready_slots(g, 1, exclude=frozenset(first.values()))
    # The worker's note (why it exits) is read before its exit is described, though it
    # exits right after sending it.
    last_exit = status(g)["workers"][0]["last_exit"]
    assert "request deadline" in last_exit, (last_exit, g.log_text_tail())


@pytest.mark.parametrize("worker_class", ASGI_CLASSES)
def test_request_timeout_is_said_to_be_off_under_asyncio(gunicorn_factory: Any,
                                                         worker_class: str) -> None:
    g = life(gunicorn_factory, worker_class, REQUEST_TIMEOUT="1")
    g.wait_log("request_timeout is not enforced under")
    assert get(g, "/slow?s=1.5")["version"] == "1"  # the app's own time, not cut


# -- the async bus API (asyncio workers) ---------------------------------------------------


@pytest.fixture(params=ASGI_CLASSES)
def abus(request: Any, gunicorn_factory: Any) -> Gunicorn:
    g = gunicorn_factory("async_app:app", config=BUS_CONF, cwd=APPS, workers=2,
                         env={"WORKER_CLASS": request.param})
    wait_for(lambda: len(g.worker_pids()) == 2, 20, what="2 workers")
    return g  # type: ignore[no-any-return]


def ask(g: Gunicorn, path: str, **params: Any) -> tuple[int, dict[str, Any]]:
    r = requests.get(g.url(path), params=params, timeout=30)
    return r.status_code, r.json()


def test_async_request_to_the_primary_and_to_a_worker(abus: Gunicorn) -> None:
    code, body = ask(abus, "/ask", name="echo", payload=json.dumps({"a": [1, 2]}))
    assert code == 200 and body["ok"]["primary"] and body["ok"]["payload"] == {"a": [1, 2]}
    assert body["ok"]["src"] == body["slot"]
    for slot in (0, 1):
        code, body = ask(abus, "/ask", name="echo", to=slot, payload="7")
        assert code == 200, body
        assert body["ok"]["slot"] == slot and body["ok"]["payload"] == 7
        assert body["ok"]["on_loop"] is True  # the async handler ran on the worker's loop
        code, body = ask(abus, "/ask", name="sync_echo", to=slot)
        assert body["ok"]["thread"] == "gunicorn-ext-bus" and body["ok"]["on_loop"] is False


def test_async_api_raises_the_same_errors(abus: Gunicorn) -> None:
    code, body = ask(abus, "/ask", name="missing")
    assert (code, body["error"]) == (409, "NoHandler")
    code, body = ask(abus, "/ask", name="missing", to=0)
    assert (code, body["error"]) == (409, "NoHandler")
    code, body = ask(abus, "/ask", name="boom", to=0)
    assert body["error"] == "HandlerError" and "ValueError: kaboom in an async handler" in body["message"]
    code, body = ask(abus, "/ask", name="boom")  # the primary's handler
    assert body["error"] == "HandlerError" and "kaboom in the primary" in body["message"]
    code, body = ask(abus, "/ask", name="nap", to=1, payload="3", timeout="0.3")
    assert body["error"] == "RequestTimeout"
    code, body = ask(abus, "/ask", name="echo", to=9)
    assert body["error"] == "WorkerGone"
    code, body = ask(abus, "/ask", name="bad_reply", to=0)
    assert body["error"] == "HandlerError" and "can't carry" in body["message"]
    code, body = ask(abus, "/ask", name="echo", make="object")
    assert body["error"] == "UnencodableMessage"
    code, body = ask(abus, "/ask", name="echo", make=f"big:{20 << 20}")
    assert body["error"] == "MessageTooLarge"
    # The bus is still fine after every error.
    assert ask(abus, "/ask", name="echo", to=1, payload="1")[1]["ok"]["slot"] == 1


def test_the_sync_request_refuses_to_block_the_loop(abus: Gunicorn) -> None:
    code, body = ask(abus, "/sync_ask", name="echo")
    assert code == 500 and body["error"] == "RuntimeError"
    assert "would block the running event loop" in body["message"] and "arequest" in body["message"]
    code, body = ask(abus, "/sync_ask_in_thread", name="echo", payload="5")
    assert code == 200 and body["ok"]["payload"] == 5  # off the loop it works


def test_async_send_broadcast_publish_reach_async_handlers(abus: Gunicorn) -> None:
    assert ask(abus, "/send", name="note", to=0, payload='"one"')[0] == 200
    assert ask(abus, "/broadcast", name="note", payload='"all"')[0] == 200
    assert ask(abus, "/publish", topic="news", payload='"extra"')[0] == 200
    assert ask(abus, "/send", name="missing", to=1)[0] == 200  # fails at the receiver...

    # Each slot's latest inbox, kept across attempts: under load the kernel can hand a
    # whole attempt's connections to one worker (asyncio workers accept for themselves).
    seen: dict[int, list[dict[str, Any]]] = {}

    def inboxes() -> list[list[dict[str, Any]]] | None:
        for _ in range(40):
            body = ask(abus, "/inbox")[1]
            seen[body["slot"]] = body["messages"]
        if len(seen) < 2:
            return None
        s0, s1 = seen[0], seen[1]
        ok = ([m["payload"] for m in s0 if m["kind"] == "note"] == ["one", "all"]
              and [m["payload"] for m in s1 if m["kind"] == "note"] == ["all"]
              and all(any(m["kind"] == "news" for m in s) for s in (s0, s1)))
        return [s0, s1] if ok else None

    got = wait_for(inboxes, 15, interval=0.2, what="every message delivered once")
    assert all(m["on_loop"] for s in got for m in s)

    def error_back() -> list[dict[str, Any]] | None:
        for _ in range(20):
            errs = ask(abus, "/errors")[1]["errors"]
            if errs:
                return errs  # type: ignore[no-any-return]
        return None

    errs = wait_for(error_back, 10, interval=0.2, what="the error callback")
    assert errs[0]["name"] == "missing" and errs[0]["error"] == "NoHandler"  # ...and comes back


def test_handler_heavy_load_does_not_block_the_loop(abus: Gunicorn) -> None:
    # Slot 0's loop runs 300 async handlers of 0.5 s at once, and the listener thread a
    # sync one of 2 s; serial, they would take minutes. Meanwhile every worker's slow
    # endpoint keeps its own latency (0.2 s, with a loaded machine's margin).
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(ask, abus, "/flood", n=150, name="nap", payload="0.5", to=0)
                  for _ in range(2)]
        sync = pool.submit(ask, abus, "/ask", name="sync_nap", payload="2", to=0, timeout="10")
        time.sleep(0.2)
        slow = []
        for _ in range(6):
            t0 = time.perf_counter()
            code, body = ask(abus, "/slow", s="0.2")
            assert code == 200
            slow.append(time.perf_counter() - t0)
        results = [f.result(timeout=60) for f in floods]
        assert sync.result(timeout=30)[1]["ok"] == 2.0
    for r in results:
        assert r[0] == 200 and r[1]["errors"] == [], r
        assert r[1]["seconds"] < 15  # concurrent on the loop, not one after the other
    assert max(slow) < 3.0, slow


def test_async_request_fails_fast_when_the_target_worker_dies(gunicorn_factory: Any,
                                                              tmp_path: Path) -> None:
    for worker_class in ASGI_CLASSES:
        markers = tmp_path / worker_class
        markers.mkdir()
        g = gunicorn_factory("async_app:app", config=BUS_CONF, cwd=APPS, workers=2,
                             env={"WORKER_CLASS": worker_class, "SLEEP_MARKER_DIR": str(markers)})
        wait_for(lambda g=g: len(g.worker_pids()) == 2, 20, what="2 workers")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(ask, g, "/ask_other", name="nap", payload="20", timeout="25")
            napping = wait_for(lambda m=markers: list(m.glob("napping-*")), 10,
                               what="the other worker napping")
            os.kill(int(napping[0].name.split("-")[1]), signal.SIGKILL)
            t0 = time.perf_counter()
            code, body = pending.result(timeout=20)
        assert body["error"] == "WorkerGone", body
        assert time.perf_counter() - t0 < 15  # not the 25 s timeout
        wait_for(lambda g=g: ask(g, "/ask_other", name="echo")[0] == 200, 20,
                 what="the slot back")
        g.stop()


def test_garbage_on_the_bus_fails_the_waiters_and_replaces_the_worker(abus: Gunicorn) -> None:
    code, body = ask(abus, "/garbage_then_ask")
    assert body["error"] == "BusClosed", body  # at once, not after the request's 20 s
    assert body["seconds"] < 10
    abus.wait_log("lost its bus")

    def replaced() -> bool:
        pids = abus.worker_pids()
        return len(pids) == 2 and body["pid"] not in pids

    wait_for(replaced, 20, what="the worker replaced in its slot")
    for slot in (0, 1):  # both slots on the bus again
        wait_for(lambda s=slot: ask(abus, "/ask", name="echo", to=s)[0] == 200, 20,
                 what=f"slot {slot} answering")


# -- gevent: the bus cooperates ------------------------------------------------------------


def test_gevent_bus_waits_yield_to_other_requests(gunicorn_factory: Any) -> None:
    g = gunicorn_factory("busapp:app", config=BUS_CONF, cwd=APPS, workers=1,
                         env={"WORKER_CLASS": "gevent"})
    # The worker asks itself: one greenlet waits 3 s for the reply while the listener's
    # greenlet sleeps in the handler; the same worker answers other requests meanwhile.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(requests.get, g.url("/ask"),
                              params={"name": "sleep", "payload": "3", "to": "0"}, timeout=30)
        time.sleep(0.3)
        t0 = time.perf_counter()
        asked = requests.get(g.url("/ask"), params={"name": "echo", "payload": "1"}, timeout=30)
        took = time.perf_counter() - t0
        assert asked.json()["ok"]["payload"] == 1
        assert not waiting.done() and took < 2.5  # the hub was not blocked by the wait
        assert waiting.result(timeout=30).json()["ok"] == 0
    # Many greenlets asking at once each get their own reply.
    r = requests.get(g.url("/ask_many"), params={"threads": 8, "n": 20}, timeout=60).json()
    assert r["errors"] == [] and r["wrong"] == [] and r["done"] == 160, r
