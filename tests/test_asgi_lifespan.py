"""When ClusterMiddleware reports an ASGI worker ready: what each kind of lifespan app does,
in each lifespan mode (unit level: a real loop, the middleware, and the app's messages;
tests/test_worker_classes.py has the rollout through real servers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gunicorn_ext.asgi import ClusterMiddleware
from gunicorn_ext.ipc.bus import Bus


async def completes(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})


async def fails(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


async def raises(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("this app speaks no lifespan")


async def returns(scope: Any, receive: Any, send: Any) -> None:
    return None


async def hangs(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.sleep(3600)


def run(app: Any, required: bool) -> tuple[list[str], BaseException | None]:
    """The lifespan scope through the middleware, as a server runs it: the startup
    message, then (like ``-k asgi`` after its startup timeout) a cancel of a call still
    running after 0.2 s. Returns the ready calls and what the call raised."""
    calls: list[str] = []
    mw = ClusterMiddleware(app, Bus(), None, ready=lambda: calls.append("ready"),
                           lifespan_required=required)

    async def main() -> BaseException | None:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await q.put({"type": "lifespan.startup"})
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        task = asyncio.ensure_future(mw({"type": "lifespan"}, q.get, send))
        done, _ = await asyncio.wait([task], timeout=0.2)
        if not done:
            task.cancel()
        try:
            await task
        except BaseException as exc:  # noqa: BLE001 - what the server would see
            return exc
        return None

    return calls, asyncio.run(main())


@pytest.mark.parametrize("required", [False, True], ids=["auto", "on"])
def test_ready_once_the_startup_completed(required: bool) -> None:
    assert run(completes, required) == (["ready"], None)


@pytest.mark.parametrize("required", [False, True], ids=["auto", "on"])
def test_never_ready_when_the_startup_failed(required: bool) -> None:
    assert run(fails, required) == ([], None)


def test_an_app_without_lifespan_is_ready_in_auto_mode_and_its_error_reaches_the_server() -> None:
    calls, exc = run(raises, required=False)
    assert calls == ["ready"] and isinstance(exc, RuntimeError)
    assert run(returns, required=False) == (["ready"], None)


def test_lifespan_on_needs_the_startup_completed() -> None:
    calls, exc = run(raises, required=True)
    assert calls == [] and isinstance(exc, RuntimeError)
    assert run(returns, required=True) == ([], None)  # -k asgi stops such a worker


@pytest.mark.parametrize("required", [False, True], ids=["auto", "on"])
def test_a_startup_the_server_gave_up_on_is_never_ready(required: bool) -> None:
    calls, exc = run(hangs, required)
    assert calls == [] and isinstance(exc, asyncio.CancelledError)


def test_other_scopes_and_later_lifespans_pass_through_untouched() -> None:
    calls: list[str] = []
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    mw = ClusterMiddleware(app, Bus(), None, ready=lambda: calls.append("ready"))

    async def main() -> None:
        await mw({"type": "websocket"}, None, None)
        await mw({"type": "lifespan"}, None, None)  # silent: ready
        await mw({"type": "lifespan"}, None, None)  # a second one: nothing more

    asyncio.run(main())
    assert seen == ["websocket", "lifespan", "lifespan"] and calls == ["ready"]
