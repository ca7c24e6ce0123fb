"""What a bus handler receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from . import frames
from .errors import HandlerError, IPCError, MessageTooLarge, NoHandler, UnencodableMessage
from .frames import PRIMARY, Err, Rep, Req


class Message(msgspec.Struct, frozen=True):
    """A message or request delivered to a handler.

    ``src`` is the sender's slot, or :data:`~gunicorn_ext.ipc.frames.PRIMARY`
    (-1) when the primary sent it. It is set by the primary, never taken from
    the sender's own claim.
    """

    name: str
    payload: Any
    src: int = PRIMARY


#: A handler takes the message and returns the reply (ignored for one-way sends).
Handler = Callable[[Message], Any]
#: Called with ``(name, error)`` when a one-way message could not be handled.
ErrorCallback = Callable[[str, Exception], None]


def run_handler(handlers: dict[str, Handler], name: str, payload: Any, src: int, where: str,
                log: Any) -> Any:
    """Run the handler for ``name`` as ``where`` ("the primary", "worker slot 3").

    No handler raises :class:`NoHandler`; a handler that raises is logged with
    its traceback here, in the receiver, and reported to the sender as a
    :class:`HandlerError` carrying the exception's type and text.
    """
    fn = handlers.get(name)
    if fn is None:
        raise NoHandler(f"{where} has no handler for {name!r}")
    try:
        return fn(Message(name, payload, src))
    except IPCError:
        raise
    except Exception as exc:
        if log is not None:
            log.exception("gunicorn-ext: handler %r in %s raised", name, where)
        raise HandlerError(f"handler {name!r} in {where} raised {type(exc).__name__}: {exc}") from exc


def answer(handlers: dict[str, Handler], req: Req, where: str, log: Any, max_frame: int) -> bytes:
    """Run the handler for request ``req`` (``src`` already set) and return the
    encoded reply to send back: the handler's value, or the error.

    A value the bus can't carry (not a msgpack value, or over ``max_frame``)
    becomes a :class:`HandlerError` for the asker at once, never a timeout.
    Both ends of the bus answer requests through this one function.
    """
    try:
        value = run_handler(handlers, req.name, req.payload, req.src, where, log)
    except IPCError as exc:
        return frames.encode(Err(req.id, exc.code, str(exc)))
    try:
        return frames.encode(Rep(req.id, value), max_frame)
    except (MessageTooLarge, UnencodableMessage) as exc:
        text = f"handler {req.name!r} in {where} returned a reply the bus can't carry: {exc}"
        if log is not None:
            log.error("gunicorn-ext: %s", text)
        return frames.encode(Err(req.id, HandlerError.code, text))
