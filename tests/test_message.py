"""How both ends of the bus run handlers and subscribers (gunicorn_ext/ipc/message.py:
Handlers, Subscribers).

The primary and the workers answer requests and one-way messages through the one
:class:`Handlers`; these cases pin what goes back for each outcome, sync and async,
and what is logged where. ``tests/test_hub_fork.py`` checks the same across a real
fork, and tests/test_ipc.py through real Gunicorn workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from logs import RecordingLog

from gunicorn_ext.ipc import frames
from gunicorn_ext.ipc.errors import NoHandler, RequestTimeout, WorkerGone
from gunicorn_ext.ipc.frames import Err, Msg, Rep, Req
from gunicorn_ext.ipc.hub import Hub
from gunicorn_ext.ipc.message import Handlers, Message, Subscribers

MAX = 4096
WHERE = ["the primary", "worker slot 3"]


def decode(data: bytes | None) -> frames.Frame | None:
    if data is None:
        return None
    reader = frames.FrameReader(MAX + frames.ROUTING_SLACK)
    (frame,) = reader.feed(data)
    return frame


def make(where: str, **fns: Callable[[Message], Any]) -> tuple[Handlers, RecordingLog]:
    handlers = Handlers(where, allow_async=where != "the primary")
    handlers.log = RecordingLog()
    for name, fn in fns.items():
        handlers.add(name, fn)
    return handlers, handlers.log


def boom(msg: Message) -> Any:
    raise ValueError("kaput")


def too_slow(msg: Message) -> Any:
    raise RequestTimeout("request 'x' to slot 1: no reply within 1s")


# (handler, expected reply to Req(7, name, ..., src=2), expected log lines at (level, start))
CASES: dict[str, tuple[Callable[[Message], Any] | None, Callable[[str], Any], list[tuple[str, str]]]] = {
    "value": (lambda m: {"echo": m.payload, "src": m.src}, lambda where: Rep(7, {"echo": [1], "src": 2}), []),
    "none": (lambda m: None, lambda where: Rep(7, None), []),
    "no handler": (None, lambda where: Err(7, "no_handler", f"{where} has no handler for 'x'"), []),
    "raises": (boom, lambda where: Err(7, "handler_error", f"handler 'x' in {where} raised ValueError: kaput"),
               [("exception", "gunicorn-ext: handler 'x' in {where} raised")]),
    "raises a bus error": (too_slow, lambda where: Err(7, "timeout", "request 'x' to slot 1: no reply within 1s"),
                           []),
    "reply not msgpack": (lambda m: object(), lambda where: Err(
        7, "handler_error", f"handler 'x' in {where} returned a reply the bus can't carry: ..."),
        [("error", "gunicorn-ext: handler 'x' in {where} returned a reply the bus can't carry")]),
    "reply too large": (lambda m: "y" * (MAX + 1), lambda where: Err(
        7, "handler_error", f"handler 'x' in {where} returned a reply the bus can't carry: ..."),
        [("error", "gunicorn-ext: handler 'x' in {where} returned a reply the bus can't carry")]),
}


def same(got: frames.Frame | None, want: frames.Frame) -> None:
    """Equal, an error text ending in ``...`` compared up to there."""
    assert type(got) is type(want), got
    if isinstance(want, Err) and want.message.endswith("..."):
        assert isinstance(got, Err) and got.message.startswith(want.message[:-3]), got
        want = Err(want.id, want.code, got.message, want.dst, want.oneway, want.name)
    assert got == want


def check_log(log: RecordingLog, want: list[tuple[str, str]], where: str) -> None:
    lines = log.lines
    assert len(lines) == len(want), lines
    for (lv, text), (wlv, wstart) in zip(lines, want, strict=True):
        assert lv == wlv and text.startswith(wstart.format(where=where)), lines


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", list(CASES))
def test_a_request_gets_one_reply_for_each_outcome(where: str, case: str) -> None:
    fn, want, want_log = CASES[case]
    handlers, log = make(where, **({"x": fn} if fn else {}))
    same(decode(handlers.handle(Req(7, "x", 3, 2, [1]), MAX)), want(where))
    check_log(log, want_log, where)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", list(CASES))
def test_a_one_way_message_gets_a_notice_only_when_it_failed(where: str, case: str) -> None:
    fn, want, want_log = CASES[case]
    handlers, log = make(where, **({"x": fn} if fn else {}))
    got = decode(handlers.handle(Msg(7, "x", 3, 2, [1]), MAX))
    expected = want(where)
    if isinstance(expected, Rep) or case.startswith("reply"):
        assert got is None  # handled; what a one-way handler returns goes nowhere
        assert log.lines == []
        return
    # The notice goes back to the sender's slot, naming the message it is about.
    same(got, Err(7, expected.code, expected.message, 2, True, "x"))
    check_log(log, want_log, where)


@pytest.mark.parametrize("case", list(CASES))
def test_an_async_handler_has_the_same_outcomes_as_a_sync_one(case: str) -> None:
    fn, want, want_log = CASES[case]
    handlers, log = make("worker slot 3")
    if fn is not None:
        sync = fn

        async def afn(msg: Message) -> Any:
            await asyncio.sleep(0)
            return sync(msg)

        handlers.add("x", afn)
        assert handlers.async_names == {"x"}
    for frame in (Req(7, "x", 3, 2, [1]), Msg(7, "x", 3, 2, [1])):
        got = asyncio.run(handlers.ahandle(frame, MAX))
        twin, _ = make("worker slot 3", **({"x": fn} if fn else {}))
        assert got == twin.handle(frame, MAX), (case, frame)
    check_log(log, want_log * 2 if not case.startswith("reply") else want_log, "worker slot 3")


def test_replacing_a_handler_replaces_its_kind() -> None:
    handlers, _ = make("worker slot 0")

    async def a(msg: Message) -> int:
        return 1

    handlers.add("x", a)
    assert "x" in handlers.async_names
    handlers.add("x", lambda m: 2)
    assert handlers.async_names == set()
    assert decode(handlers.handle(Req(1, "x", 0, -1), MAX)) == Rep(1, 2)
    assert handlers.names == frozenset({"x"})


def test_the_primary_refuses_async_handlers_and_subscribers_at_registration() -> None:
    hub = Hub()

    async def ahandler(msg: Message) -> None:
        pass

    with pytest.raises(TypeError, match="the handler for 'job' can't be async def"):
        hub.handler("job")(ahandler)
    with pytest.raises(TypeError, match="the subscriber of 'news' can't be async def"):
        hub.subscribe("news")(ahandler)
    assert "job" not in hub.handler_names
    hub.handler("job")(lambda m: None)  # a sync one is fine
    assert "job" in hub.handler_names


@pytest.mark.parametrize("where", WHERE)
def test_a_failure_notice_is_logged_once_and_reaches_every_on_error_callback(where: str) -> None:
    handlers, log = make(where)
    got: list[tuple[str, Exception]] = []

    @handlers.on_error
    def first(name: str, error: Exception) -> None:
        raise RuntimeError("a broken callback")

    handlers.on_error(lambda name, error: got.append((name, error)))
    error = WorkerGone("message 'x' to slot 4: no worker in that slot")
    handlers.report("x", error)
    assert got == [("x", error)]
    assert log.lines == [
        ("warning", f"gunicorn-ext: a message {where} sent was not handled: {error}"),
        ("exception", "gunicorn-ext: on_error callback failed"),
    ]


def test_without_a_log_nothing_is_logged_and_the_reply_is_the_same() -> None:
    quiet = Handlers("worker slot 1", allow_async=True)
    quiet.add("x", boom)
    loud, _ = make("worker slot 1", x=boom)
    req = Req(5, "x", 1, -1)
    assert quiet.handle(req, MAX) == loud.handle(req, MAX)
    quiet.report("x", NoHandler("nobody"))  # no log, no callbacks: nothing to do, no crash


# -- subscribers ------------------------------------------------------------------


@pytest.mark.parametrize("where", WHERE)
def test_a_publication_reaches_every_subscriber_even_after_one_that_raises(where: str) -> None:
    subs = Subscribers(where, allow_async=where != "the primary")
    subs.log = log = RecordingLog()
    got: list[tuple[str, Message]] = []

    def boom(msg: Message) -> None:
        raise ValueError("bad subscriber")

    assert subs.add("news", lambda m: got.append(("first", m))) is True
    assert subs.add("news", boom) is False  # not the first: no new Sub frame
    assert subs.add("news", lambda m: got.append(("third", m))) is False
    subs.deliver("news", {"n": 1}, 2)
    subs.deliver("other", "nobody", 2)  # no subscriber: nothing happens
    message = Message("news", {"n": 1}, 2)
    assert got == [("first", message), ("third", message)]
    assert log.lines == [("exception", f"gunicorn-ext: subscriber of 'news' in {where} raised")]
    assert subs.remove("news") is True and subs.remove("news") is False
    subs.deliver("news", 1, 2)
    assert len(got) == 2


def test_a_workers_async_subscriber_runs_where_run_async_says_and_its_failure_is_logged() -> None:
    subs = Subscribers("worker slot 3", allow_async=True)
    subs.log = log = RecordingLog()
    ran: list[Any] = []

    async def sub(msg: Message) -> None:
        ran.append(msg.payload)
        if msg.payload == "boom":
            raise RuntimeError("late")

    subs.run_async = lambda result, topic: asyncio.run(subs.arun(result, topic))
    subs.add("news", sub)
    subs.deliver("news", "ok", 0)
    subs.deliver("news", "boom", 0)
    assert ran == ["ok", "boom"]
    assert log.lines == [("exception", "gunicorn-ext: subscriber of 'news' in worker slot 3 raised")]


def test_the_primary_closes_an_awaitable_a_subscriber_returns_and_says_why() -> None:
    subs = Subscribers("the primary", allow_async=False)
    subs.log = log = RecordingLog()
    ran: list[str] = []

    async def later() -> None:
        ran.append("ran")

    subs.add("news", lambda m: later())  # sync itself: registration can't tell
    subs.deliver("news", None, 1)
    assert ran == []
    assert log.lines == [("error", "gunicorn-ext: a subscriber of 'news' in the primary returned an "
                                   "awaitable; the primary has no event loop to run it")]
