"""The bus across real Gunicorn processes: every API, every error, every lifecycle event."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, wait_for

APPS = Path(__file__).parent / "apps"
CONF = APPS / "bus_conf.py"


def call(g: Gunicorn, path: str, **params: Any) -> dict[str, Any]:
    """One HTTP request on a fresh connection (so it may land on any worker)."""
    if "payload" in params:
        params["payload"] = json.dumps(params["payload"])
    r = requests.get(g.url(path), params=params, headers={"Connection": "close"}, timeout=30)
    assert r.status_code in (200, 502), r.text
    return r.json()  # type: ignore[no-any-return]


def ask(g: Gunicorn, name: str, payload: Any = None, to: int = -1, timeout: float = 5) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "to": to, "timeout": timeout}
    if payload is not None:
        params["payload"] = payload
    return call(g, "/ask", **params)


def cluster(g: Gunicorn) -> dict[str, Any]:
    return ask(g, "gunicorn_ext.cluster")["ok"]  # type: ignore[no-any-return]


def live_slots(g: Gunicorn) -> dict[int, int]:
    """slot -> pid of ready, non-retired workers, as the primary sees them."""
    return {w["slot"]: w["pid"] for w in cluster(g)["workers"] if w["ready"] and not w["retired"]}


def wait_slots(g: Gunicorn, n: int, timeout: float = 20, exclude: set[int] = frozenset()) -> dict[int, int]:  # type: ignore[assignment]
    def ok() -> dict[int, int] | None:
        try:
            slots = live_slots(g)
        except (requests.RequestException, KeyError):
            return None
        if sorted(slots) == list(range(n)) and not exclude & set(slots.values()):
            return slots
        return None

    return wait_for(ok, timeout, interval=0.1, what=f"slots 0..{n - 1} ready")  # type: ignore[no-any-return]


def start(factory: Any, workers: int = 2, **env: str) -> Gunicorn:
    return factory("busapp:app", config=CONF, cwd=APPS, workers=workers, env=env)  # type: ignore[no-any-return]


@pytest.fixture(params=["gthread", "sync"])
def bus2(request: pytest.FixtureRequest, gunicorn_factory: Any) -> Gunicorn:
    """Two workers of each worker class."""
    g = start(gunicorn_factory, 2, WORKER_CLASS=request.param)
    wait_slots(g, 2)
    return g


# -- worker -> primary ---------------------------------------------------------------


def test_request_to_primary_replies_with_sender_slot(bus2: Gunicorn) -> None:
    r = ask(bus2, "echo", {"x": [1, 2, "three"]})
    assert r["ok"]["primary"] is True
    assert r["ok"]["payload"] == {"x": [1, 2, "three"]}
    assert r["ok"]["src"] == r["slot"]
    assert r["ok"]["pid"] == bus2.master_pid


def test_user_hooks_still_run(bus2: Gunicorn) -> None:
    assert "user post_fork hook ran for slot 0" in bus2.log_text()
    assert "user post_fork hook ran for slot 1" in bus2.log_text()


def test_one_way_messages_arrive_in_order(bus2: Gunicorn) -> None:
    r = call(bus2, "/sendmany", name="record", n=500)
    assert r["sent"] == 500
    got = ask(bus2, "records")["ok"]
    assert got == list(range(500))


def test_distinct_errors(bus2: Gunicorn) -> None:
    r = ask(bus2, "no-such-handler")
    assert r["error"] == "NoHandler"
    r = ask(bus2, "boom")
    assert r["error"] == "HandlerError" and "kaboom in the primary" in r["message"]
    r = ask(bus2, "slow", 1.0, timeout=0.2)
    assert r["error"] == "RequestTimeout"
    r = ask(bus2, "echo", to=7)
    assert r["error"] == "WorkerGone" and "slot 7" in r["message"]
    r = ask(bus2, "no-such-handler", to=0)
    assert r["error"] == "NoHandler" and "slot 0" in r["message"]
    r = ask(bus2, "boom", to=1)
    assert r["error"] == "HandlerError" and "kaboom in a worker" in r["message"]
    # The bus still works after every kind of failure.
    assert ask(bus2, "echo", 1)["ok"]["payload"] == 1
    assert "handler 'boom' in the primary raised" in bus2.log_text()


@pytest.mark.parametrize("to", [-1, 0])
def test_concurrent_requests_from_many_threads_each_get_their_reply(bus2: Gunicorn, to: int) -> None:
    r = call(bus2, "/ask_many", threads=8, n=300, to=to)
    assert r["errors"] == [] and r["wrong"] == [] and r["done"] == 2400


# -- worker <-> worker, broadcast, pub/sub ---------------------------------------------


def test_worker_to_worker_request_is_relayed(bus2: Gunicorn) -> None:
    for target in (0, 1):
        r = ask(bus2, "echo", "hi", to=target)
        assert r["ok"]["slot"] == target
        assert r["ok"]["src"] == r["slot"]
        assert r["ok"]["payload"] == "hi"


def test_broadcast_reaches_every_worker(bus2: Gunicorn) -> None:
    call(bus2, "/broadcast", name="note", payload={"n": 42})

    def everyone_has_it() -> bool:
        return all(
            any(m["payload"] == {"n": 42} for m in ask(bus2, "inbox", to=s)["ok"]) for s in (0, 1)
        )

    wait_for(everyone_has_it, 10, what="broadcast in both inboxes")


def test_direct_one_way_message_to_slot(bus2: Gunicorn) -> None:
    r = call(bus2, "/send", name="note", payload="for-one", to=1)
    wait_for(lambda: any(m["payload"] == "for-one" for m in ask(bus2, "inbox", to=1)["ok"]), 10)
    msgs = [m for m in ask(bus2, "inbox", to=1)["ok"] if m["payload"] == "for-one"]
    assert msgs[0]["src"] == r["slot"]
    assert not any(m["payload"] == "for-one" for m in ask(bus2, "inbox", to=0)["ok"])


def test_publish_reaches_subscribers(bus2: Gunicorn) -> None:
    call(bus2, "/publish", topic="news", payload="extra!")
    wait_for(
        lambda: all(
            any(m["kind"] == "news" and m["payload"] == "extra!" for m in ask(bus2, "inbox", to=s)["ok"])
            for s in (0, 1)
        ),
        10,
        what="publication in both inboxes",
    )


def test_one_way_failure_comes_back_to_sender(bus2: Gunicorn) -> None:
    r = call(bus2, "/send", name="nobody-handles-this", to=0)
    sender = r["slot"]

    def reported() -> bool:
        errors = ask(bus2, "echo", to=sender)  # make sure sender is alive
        assert errors["ok"]["slot"] == sender
        got = call_on_slot(bus2, sender, "/errors")
        return any(e["name"] == "nobody-handles-this" and e["error"] == "NoHandler" for e in got["errors"])

    wait_for(reported, 10, what="NoHandler notice at the sender")


def call_on_slot(g: Gunicorn, slot: int, path: str, tries: int = 200) -> dict[str, Any]:
    """Repeat a request until the worker in ``slot`` answers it."""
    for _ in range(tries):
        r = call(g, path)
        if r.get("slot") == slot:
            return r
    raise AssertionError(f"no answer from slot {slot} in {tries} tries")


# -- the primary's API -------------------------------------------------------------------


def primary_api(g: Gunicorn, *args: Any) -> dict[str, Any]:
    ask(g, "primary_ask", list(args))
    got: list[dict[str, Any]] = []

    def done() -> bool:
        got.extend(ask(g, "primary_results")["ok"])
        return bool(got)

    wait_for(done, 10, what="primary API result")
    return got[0]


def test_primary_request_send_broadcast_publish(bus2: Gunicorn) -> None:
    r = primary_api(bus2, "request", 1, "echo", "from-primary")
    assert r["ok"]["slot"] == 1 and r["ok"]["src"] == -1
    assert primary_api(bus2, "request", 5, "echo", None)["error"] == "WorkerGone"
    assert primary_api(bus2, "request", 0, "nope", None)["error"] == "NoHandler"
    for kind in ("request", "send", "broadcast", "publish"):  # refused in the caller, at once
        for bad, error in (("UNENCODABLE", "UnencodableMessage"), ("HUGE_INT", "UnencodableMessage"),
                           ("TOO_LARGE", "MessageTooLarge")):
            assert primary_api(bus2, kind, 0, "echo", bad)["error"] == error, (kind, bad)
    assert primary_api(bus2, "send", 0, "note", "p-direct") == {"ok": "sent"}
    assert primary_api(bus2, "broadcast", 0, "note", "p-all") == {"ok": "sent"}
    assert primary_api(bus2, "publish", 0, "news", "p-news") == {"ok": "sent"}
    for slot in (0, 1):
        wait_for(
            lambda s=slot: {"p-all", "p-news"} <= {m["payload"] for m in ask(bus2, "inbox", to=s)["ok"]},
            10,
        )
    assert "p-direct" in {m["payload"] for m in ask(bus2, "inbox", to=0)["ok"]}
    assert "p-direct" not in {m["payload"] for m in ask(bus2, "inbox", to=1)["ok"]}


# -- what the bus can't carry -------------------------------------------------------------

BIG = f"big:{5 * 1024 * 1024}"  # over the default ipc_max_frame (4 MiB)
REFUSED = [(BIG, "MessageTooLarge"), ("int", "UnencodableMessage"),
           ("neg_int", "UnencodableMessage"), ("object", "UnencodableMessage")]


def assert_bus_intact(g: Gunicorn, slots: dict[int, int]) -> None:
    """Same workers on the bus as before, each answering; no connection was closed."""
    assert live_slots(g) == slots
    for slot in slots:
        assert ask(g, "echo", "still here", to=slot)["ok"]["slot"] == slot
    log = g.log_text()
    assert "closing the bus connection" not in log and "lost its bus" not in log


def test_sender_refuses_what_the_bus_cannot_carry(bus2: Gunicorn) -> None:
    slots = live_slots(bus2)
    for make, error in REFUSED:
        for path, params in (("/send", {"name": "record"}), ("/send", {"name": "note", "to": 1}),
                             ("/broadcast", {"name": "note"}), ("/publish", {"topic": "news"}),
                             ("/ask", {"name": "record"}), ("/ask", {"name": "echo", "to": 0})):
            r = call(bus2, path, make=make, **params)
            assert r.get("error") == error, (path, params, make, r)
            if error == "MessageTooLarge":
                assert "over the bus limit of 4194304 bytes (ipc_max_frame)" in r["message"]
            else:
                assert "can't be sent on the bus" in r["message"]
    assert ask(bus2, "records")["ok"] == []  # nothing refused reached the primary
    for slot in slots:
        got = ask(bus2, "inbox", to=slot)["ok"]
        assert got == [], got  # nor a worker
    assert_bus_intact(bus2, slots)


def test_reply_the_bus_cannot_carry_is_a_handler_error(bus2: Gunicorn) -> None:
    slots = live_slots(bus2)
    for spec in (BIG, "int", "object"):
        # Primary and worker handlers; the asker waits 20 s at most but gets its answer at once.
        for to in (-1, 0, 1):
            r = ask(bus2, "bad_reply", spec, to=to, timeout=20)
            assert r.get("error") == "HandlerError", (spec, to, r)
            assert "returned a reply the bus can't carry" in r["message"]
        r = primary_api(bus2, "request", 1, "bad_reply", spec)
        assert r.get("error") == "HandlerError", (spec, r)
    assert "handler 'bad_reply' in the primary returned a reply the bus can't carry" in bus2.log_text()
    assert_bus_intact(bus2, slots)


# -- hostile frames --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,reason,worker_class",
    [
        ("oversize", "exceeds the limit of 4194304 bytes (ipc_max_frame)", "gthread"),
        ("malformed", "undecodable frame", "sync"),
        ("unknown", "unknown message type", "gthread"),
    ],
)
def test_bad_frame_closes_that_connection_and_its_worker_is_replaced(
        gunicorn_factory: Any, kind: str, reason: str, worker_class: str) -> None:
    g = start(gunicorn_factory, 2, WORKER_CLASS=worker_class)
    before = wait_slots(g, 2)
    # The worker writes garbage into its own bus, then goes on with its request.
    bad = call(g, "/garbage_then_sleep", kind=kind, s=1.5)
    assert bad["sent"] == kind  # the in-flight request finished though the bus went away
    slot, pid = bad["slot"], bad["pid"]
    assert before[slot] == pid
    log = g.wait_log(f"closing the bus connection of worker slot {slot} (pid {pid}): ")
    assert reason in log
    # One line in the worker says why it goes; it is replaced in its slot, the other stays.
    needle = f"worker slot {slot} (pid {pid}) lost its bus: the primary closed it: "
    lines = [ln for ln in g.wait_log(needle).splitlines() if needle in ln]
    assert len(lines) == 1 and reason in lines[0] and "finishing in-flight requests" in lines[0]
    after = wait_slots(g, 2, exclude={pid})
    assert after[1 - slot] == before[1 - slot]
    assert g.log_text().count(f"(pid {pid}) lost its bus") == 1
    for s in (0, 1):
        assert ask(g, "echo", "x", to=s)["ok"]["pid"] == after[s]
    assert g.alive()


def test_worker_cut_off_for_not_reading_its_bus_is_replaced(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 2, IPC_MAX_BACKLOG=str(4 << 20))
    before = wait_slots(g, 2)
    call(g, "/send", name="sleep", payload=4, to=0)  # slot 0's listener is busy for 4 s...
    call(g, "/flood", n=100, size=100_000, to=0)  # ...while 10 MB queue up for it
    g.wait_log(f"closing the bus connection of worker slot 0 (pid {before[0]}): it is not "
               "reading its bus messages")
    g.wait_log(f"worker slot 0 (pid {before[0]}) lost its bus")
    after = wait_slots(g, 2, exclude={before[0]})
    assert after[1] == before[1]
    assert ask(g, "echo", "x", to=0)["ok"]["pid"] == after[0]


# -- lifecycle -----------------------------------------------------------------------------


def test_killed_worker_keeps_its_slot(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 3)
    before = wait_slots(g, 3)
    os.kill(before[1], signal.SIGKILL)
    after = wait_slots(g, 3, exclude={before[1]})
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1] != before[1]
    assert ask(g, "echo", "again", to=1)["ok"]["pid"] == after[1]


def test_worker_killed_mid_request_reports_worker_gone(gunicorn_factory: Any, tmp_path: Path) -> None:
    g = start(gunicorn_factory, 2, SLEEP_MARKER_DIR=str(tmp_path))
    slots = wait_slots(g, 2)
    result: dict[str, Any] = {}

    def asker() -> None:
        result.update(call(g, "/ask_other", name="sleep", payload=30, timeout=60))

    t0 = time.monotonic()
    t = threading.Thread(target=asker, daemon=True)
    t.start()
    marker = wait_for(lambda: list(tmp_path.glob("sleeping-*")), 10, what="a worker sleeping")
    victim = int(marker[0].name.split("-")[1])
    assert victim in slots.values()
    os.kill(victim, signal.SIGKILL)
    t.join(20)
    assert result.get("error") == "WorkerGone", result
    assert "exited before replying" in result["message"]
    assert time.monotonic() - t0 < 20
    wait_slots(g, 2, exclude={victim})


def test_hup_reload_keeps_slots_and_bus(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 2)
    before = wait_slots(g, 2)
    g.signal(signal.SIGHUP)
    after = wait_slots(g, 2, exclude=set(before.values()))
    wait_for(lambda: len(cluster(g)["workers"]) == 2, 15, what="old workers gone")
    assert ask(g, "echo", 1, to=1)["ok"]["pid"] == after[1]
    call(g, "/broadcast", name="note", payload="after-hup")
    for s in (0, 1):
        wait_for(lambda s=s: "after-hup" in {m["payload"] for m in ask(g, "inbox", to=s)["ok"]}, 10)


def test_ttin_ttou_keep_slots_dense(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 2)
    first = wait_slots(g, 2)
    g.signal(signal.SIGTTIN)
    three = wait_slots(g, 3)
    assert three[0] == first[0] and three[1] == first[1]
    g.signal(signal.SIGTTOU)
    wait_for(lambda: sorted(w["slot"] for w in cluster(g)["workers"]) == [0, 1], 15,
             what="slot 2 stopped")
    two = live_slots(g)
    assert two == first  # the highest slot went, not the oldest worker


def test_max_requests_recycling_keeps_slots(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 2, MAX_REQUESTS="25")
    first = wait_slots(g, 2)
    for _ in range(120):
        try:
            call(g, "/whoami")
        except requests.RequestException:
            pass
    wait_slots(g, 2, exclude=set(first.values()))
    # Workers keep recycling while we ask (every request counts), so allow a retry
    # when the ask lands on a worker in the middle of its replacement.
    wait_for(lambda: ask(g, "echo", 2, to=0).get("ok", {}).get("slot") == 0, 15,
             what="slot 0 answering after recycling")


class ScriptGunicorn(Gunicorn):
    """Started by the ``gunicorn`` script: USR2 re-executes argv, and ``python -m gunicorn``
    re-executes as ``python .../gunicorn/__main__.py``, which puts gunicorn's package dir
    first on sys.path so its ``http`` package shadows the stdlib's (a Gunicorn quirk)."""

    @property
    def command(self) -> list[str]:
        return [str(Path(sys.executable).parent / "gunicorn"), *super().command[3:]]


def test_usr2_reexec_gives_new_master_its_own_bus(tmp_path: Path) -> None:
    g = ScriptGunicorn("busapp:app", config=CONF, cwd=APPS, workers=2, log_dir=tmp_path)
    try:
        g.start()
        g.wait_ready()
        _usr2(g)
    finally:
        g.stop()


def _usr2(g: Gunicorn) -> None:
    wait_slots(g, 2)
    old_master = g.master_pid
    g.signal(signal.SIGUSR2)

    def new_master_serving() -> bool:
        r = ask(g, "echo", 1)
        return r.get("ok", {}).get("pid") not in (None, old_master)

    wait_for(new_master_serving, 20, what="a request answered by the new master's bus")
    # Retire the old generation, as the USR2 procedure says; the new one carries on.
    os.kill(old_master, signal.SIGTERM)
    wait_for(lambda: ask(g, "echo", 1).get("ok", {}).get("pid") not in (None, old_master), 20)
    wait_slots(g, 2)


# -- async sends and a primary that stops reading (one Bus over socketpairs, no Gunicorn) ---

#: Each publication; with the socket buffers below, a few fill the call channel.
_BIG = 256 * 1024


class _FakePrimary:
    """The primary's end of one worker's bus, which reads only when told to."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import socket

        from gunicorn_ext.ipc import bus as bus_module
        from gunicorn_ext.ipc import frames

        self.frames = frames
        self.call, worker_call = socket.socketpair()
        self.push, worker_push = socket.socketpair()
        worker_call.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        self.call.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        self.signals: list[int] = []
        real_kill = os.kill

        def kill(pid: int, sig: int) -> None:  # a lost bus SIGTERMs its own worker: record it
            if pid == os.getpid():
                self.signals.append(sig)
            else:
                real_kill(pid, sig)

        monkeypatch.setattr(bus_module.os, "kill", kill)
        self.bus = bus_module.Bus()
        self.bus.attach(worker_call, worker_push, 0, frozenset({"job"}), _NoLog(),
                        frames.DEFAULT_MAX_FRAME)
        self.reader = frames.FrameReader()
        self.got: list[Any] = []

    def read_all(self, count: int, timeout: float = 20) -> list[Any]:
        """Read (in the calling thread) until ``count`` frames came in all."""
        self.call.settimeout(timeout)
        while len(self.got) < count:
            data = self.call.recv(1 << 20)
            assert data, "the worker closed its end"
            self.got += self.reader.feed(data)
        return self.got

    def close(self) -> None:
        self.bus.close()
        self.call.close()
        self.push.close()


class _NoLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


@pytest.fixture
def fake_primary(monkeypatch: pytest.MonkeyPatch) -> Any:
    p = _FakePrimary(monkeypatch)
    yield p
    p.close()


def _run_with_watchdog(coro: Any, unblock: Any, seconds: float = 10) -> Any:
    """asyncio.run(coro), bounded: should the loop block anyway, ``unblock()`` runs in a
    thread after ``seconds`` (the test then fails on what it sees instead of hanging)."""
    import asyncio

    timer = threading.Timer(seconds, unblock)
    timer.daemon = True
    timer.start()
    try:
        return asyncio.run(asyncio.wait_for(coro, seconds + 10))
    finally:
        timer.cancel()


async def _loop_turns(count: int, seconds: float = 10) -> int:
    """Let the loop turn ``count`` times (a coroutine sleeping 1 ms a turn), ``seconds``
    at most; how many turns it made. A loop blocked elsewhere makes none."""
    import asyncio

    turns = 0
    deadline = time.monotonic() + seconds
    while turns < count and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
        turns += 1
    return turns


def test_async_sends_wait_for_a_primary_that_stops_reading_without_blocking_the_loop(
        fake_primary: _FakePrimary) -> None:
    import asyncio

    p = fake_primary
    n = 12  # 3 MiB for a 16 KiB socket buffer: most of it waits for the primary

    async def main() -> tuple[int, bool]:
        async def publisher(tag: str) -> None:
            for i in range(n):
                await p.bus.apublish("news", {"tag": tag, "i": i, "blob": b"x" * _BIG})

        async def sender() -> None:
            for i in range(n):
                await p.bus.asend("job", i)

        work = asyncio.gather(publisher("a"), publisher("b"), sender())
        # The primary reads nothing yet: the senders wait, the loop turns on.
        turns = await _loop_turns(200)
        blocked_meanwhile = not work.done()
        # Now it reads (in a thread, as the real primary would from its own process).
        reader = asyncio.get_running_loop().run_in_executor(None, p.read_all, 3 * n)
        await asyncio.wait_for(work, 20)
        await asyncio.wait_for(reader, 20)
        return turns, blocked_meanwhile

    turns, blocked_meanwhile = _run_with_watchdog(main(), lambda: p.read_all(3 * n))
    assert blocked_meanwhile  # the socket was full: the sends really had to wait
    assert turns >= 200  # ...and the loop ran on meanwhile
    # Everything arrived whole, each sender's frames in the order sent.
    kinds = [(type(f).__name__, f.payload["tag"] if type(f).__name__ == "Pub" else None)
             for f in p.got]
    for tag in ("a", "b"):
        got = [f.payload for f in p.got if type(f).__name__ == "Pub" and f.payload["tag"] == tag]
        assert [g["i"] for g in got] == list(range(n)), kinds
        assert all(g["blob"] == b"x" * _BIG for g in got)
    assert [f.payload for f in p.got if type(f).__name__ == "Msg"] == list(range(n))
    assert p.signals == [] and p.bus.connected


def test_sync_sends_in_async_code_never_block_the_loop(fake_primary: _FakePrimary) -> None:
    """worker.send()/publish() called from a coroutine (an app that didn't switch to
    the async API) against a primary that reads nothing: the loop turns on, and every
    frame arrives whole, in the order sent, once the primary reads."""
    import asyncio

    p = fake_primary
    n = 12  # 3 MiB for a 16 KiB socket buffer

    async def main() -> tuple[int, float]:
        t0 = time.monotonic()
        for i in range(n):
            p.bus.publish("news", {"i": i, "blob": b"x" * _BIG})
            p.bus.send("job", i)
        took = time.monotonic() - t0
        turns = await _loop_turns(100)
        reader = asyncio.get_running_loop().run_in_executor(None, p.read_all, 2 * n)
        await asyncio.wait_for(reader, 20)
        return turns, took

    turns, took = _run_with_watchdog(main(), lambda: p.read_all(2 * n))
    assert turns >= 100 and took < 5  # the primary read nothing meanwhile: nothing waited
    assert [f.payload["i"] for f in p.got if type(f).__name__ == "Pub"] == list(range(n))
    assert all(f.payload["blob"] == b"x" * _BIG for f in p.got if type(f).__name__ == "Pub")
    assert [f.payload for f in p.got if type(f).__name__ == "Msg"] == list(range(n))
    kinds = [type(f).__name__ for f in p.got]
    assert kinds == ["Pub", "Msg"] * n  # one order for both kinds, as sent
    assert p.signals == [] and p.bus.connected


def test_an_async_send_waiting_on_a_primary_that_goes_away_raises_bus_closed(
        fake_primary: _FakePrimary) -> None:
    import asyncio

    from gunicorn_ext.ipc.errors import BusClosed

    p = fake_primary

    async def main() -> tuple[BaseException | None, int]:
        async def publisher() -> None:
            for _i in range(50):
                await p.bus.apublish("news", b"x" * _BIG)

        pub = asyncio.create_task(publisher())
        turns = await _loop_turns(100)
        assert not pub.done()
        p.call.close()  # the primary is gone
        try:
            await asyncio.wait_for(pub, 20)
        except BaseException as exc:  # noqa: BLE001 - what it raised is the point
            return exc, turns
        return None, turns

    err, turns = _run_with_watchdog(main(), p.call.close)
    assert isinstance(err, BusClosed) and "writing to the primary failed" in str(err), repr(err)
    assert turns >= 100
    assert p.signals == [signal.SIGTERM] and not p.bus.connected  # the worker would exit


def test_async_sends_refuse_what_the_bus_cannot_carry_before_writing(
        fake_primary: _FakePrimary) -> None:
    import asyncio

    from gunicorn_ext.ipc.errors import MessageTooLarge, NoHandler, UnencodableMessage

    p = fake_primary
    huge = b"x" * (p.frames.DEFAULT_MAX_FRAME + 1)
    for call_it, error in [
        (lambda: p.bus.apublish("news", huge), MessageTooLarge),
        (lambda: p.bus.asend("job", huge), MessageTooLarge),
        (lambda: p.bus.abroadcast("job", object()), UnencodableMessage),
        (lambda: p.bus.asend("nobody", 1), NoHandler),
    ]:
        with pytest.raises(error):
            asyncio.run(call_it())
    with pytest.raises(MessageTooLarge):
        p.bus.publish("news", huge)  # the same error as the sync send's
    asyncio.run(p.bus.apublish("news", "small"))
    assert [f.payload for f in p.read_all(1)] == ["small"]  # only what could be carried
    assert p.signals == [] and p.bus.connected


def test_a_cancelled_async_send_still_leaves_whole_frames_on_the_bus(
        fake_primary: _FakePrimary) -> None:
    import asyncio

    p = fake_primary

    async def main() -> None:
        tasks = [asyncio.create_task(p.bus.apublish("news", {"i": i, "blob": b"x" * _BIG}))
                 for i in range(8)]
        await asyncio.sleep(0.2)  # the socket is full: most of them wait
        assert not all(t.done() for t in tasks)
        for t in tasks[2:]:
            t.cancel()
        await asyncio.sleep(0)
        # Whatever was handed to the writer thread goes out whole; then the bus works on.
        reader = asyncio.get_running_loop().run_in_executor(None, p.read_all, 8 + 1)
        await asyncio.sleep(0.2)
        await p.bus.apublish("news", {"i": "after"})
        await asyncio.wait_for(reader, 20)

    _run_with_watchdog(main(), lambda: p.read_all(9))
    assert p.reader.error is None
    got = [f.payload["i"] for f in p.got]
    assert got[:2] == [0, 1] and got[-1] == "after", got
    assert sorted(got[:-1]) == list(range(8)), got  # cancelled or not, each arrived whole
    assert p.signals == [] and p.bus.connected
