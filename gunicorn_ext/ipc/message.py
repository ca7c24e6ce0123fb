"""What a bus handler receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from .errors import HandlerError, IPCError, NoHandler
from .frames import PRIMARY


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
