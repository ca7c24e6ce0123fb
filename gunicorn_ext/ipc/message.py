"""What a bus handler receives, and the one way both ends of the bus run handlers.

The primary (``ipc/hub.py``) and every worker (``ipc/bus.py``) keep their handlers
in a :class:`Handlers`: it registers them, runs the handler for a request or a
one-way message (sync, or ``async def`` on a worker's event loop), maps what
happened to the frame that goes back (a :class:`~gunicorn_ext.ipc.frames.Rep`, or
an :class:`~gunicorn_ext.ipc.frames.Err` with the error's code), logs a handler's
failure in the receiver, and, at the sender, hands failure notices to the
``on_error`` callbacks. Only the transport differs between the two ends.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, overload

import msgspec

from . import frames
from .errors import HandlerError, IPCError, MessageTooLarge, NoHandler, UnencodableMessage
from .frames import PRIMARY, Err, Msg, Rep, Req


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


class Handlers:
    """The handlers of one end of the bus, and how they are run.

    ``where`` names this end in error texts and log lines ("the primary", "worker
    slot 3"); ``log`` is a logging-style object, or None (nothing is logged).
    ``allow_async``: whether ``async def`` handlers may be registered (a worker,
    whose event loop runs them); the primary runs every handler in its hub thread,
    so it refuses them at registration instead of never running them.
    """

    def __init__(self, where: str, allow_async: bool) -> None:
        self.where = where
        self.log: Any = None
        self.allow_async = allow_async
        self._fns: dict[str, Handler] = {}
        #: Names whose handler is ``async def`` (run with :meth:`ahandle`).
        self.async_names: set[str] = set()
        self._error_callbacks: list[ErrorCallback] = []

    # ------------------------------------------------------------ registration

    def add(self, name: str, fn: Handler) -> None:
        """Handle ``name`` with ``fn`` from now on (replacing the handler it had)."""
        if inspect.iscoroutinefunction(fn):
            if not self.allow_async:
                raise TypeError(f"{self.where} runs its bus handlers in its hub thread, which "
                                f"has no event loop: the handler for {name!r} can't be async def")
            self.async_names.add(name)
        else:
            self.async_names.discard(name)
        self._fns[name] = fn

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._fns)

    def on_error(self, fn: ErrorCallback) -> ErrorCallback:
        """Call ``fn(name, error)`` for each failure notice :meth:`report` gets."""
        self._error_callbacks.append(fn)
        return fn

    # ------------------------------------------------------------ the receiver

    @overload
    def handle(self, frame: Req, max_frame: int) -> bytes: ...

    @overload
    def handle(self, frame: Msg, max_frame: int) -> bytes | None: ...

    def handle(self, frame: Req | Msg, max_frame: int) -> bytes | None:
        """Run the handler for ``frame`` (``src`` set by the primary); return the
        encoded frame that goes back to its sender: a request's reply (its value,
        or the error), a failed one-way message's notice, or None (it was handled).

        No handler is :class:`NoHandler`; a handler that raises is logged with its
        traceback here and becomes a :class:`HandlerError` carrying the exception's
        type and text (an :class:`IPCError` it raises goes back as it is); a reply
        the bus can't carry (not a msgpack value, or over ``max_frame``) is a
        :class:`HandlerError` for the asker at once, never a timeout.
        """
        fn = self._fns.get(frame.name)
        try:
            if fn is None:
                raise NoHandler(f"{self.where} has no handler for {frame.name!r}")
            value = fn(Message(frame.name, frame.payload, frame.src))
        except Exception as exc:
            return self._failed(frame, exc, max_frame)
        return self._reply(frame, value, max_frame) if type(frame) is Req else None

    async def ahandle(self, frame: Req | Msg, max_frame: int) -> bytes | None:
        """:meth:`handle` for an ``async def`` handler: awaited, the same outcomes."""
        fn = self._fns.get(frame.name)
        try:
            if fn is None:
                raise NoHandler(f"{self.where} has no handler for {frame.name!r}")
            value = await fn(Message(frame.name, frame.payload, frame.src))
        except Exception as exc:
            return self._failed(frame, exc, max_frame)
        return self._reply(frame, value, max_frame) if type(frame) is Req else None

    def error(self, frame: Req | Msg, error: IPCError, max_frame: int) -> bytes:
        """The encoded error that goes back for ``frame``: a request's failed reply,
        or a one-way message's failure notice (addressed to its sender)."""
        if type(frame) is Req:
            return frames.encode(Err(frame.id, error.code, str(error)), max_frame)
        return frames.encode(Err(frame.id, error.code, str(error), frame.src, True, frame.name),
                             max_frame)

    def _failed(self, frame: Req | Msg, exc: Exception, max_frame: int) -> bytes:
        # Called in the except block, so the log line carries the traceback.
        if not isinstance(exc, IPCError):
            if self.log is not None:
                self.log.exception("gunicorn-ext: handler %r in %s raised", frame.name, self.where)
            exc = HandlerError(f"handler {frame.name!r} in {self.where} raised "
                               f"{type(exc).__name__}: {exc}")
        return self.error(frame, exc, max_frame)

    def _reply(self, req: Req | Msg, value: Any, max_frame: int) -> bytes:
        try:
            return frames.encode(Rep(req.id, value), max_frame)
        except (MessageTooLarge, UnencodableMessage) as exc:
            text = f"handler {req.name!r} in {self.where} returned a reply the bus can't carry: {exc}"
            if self.log is not None:
                self.log.error("gunicorn-ext: %s", text)
            return self.error(req, HandlerError(text), max_frame)

    # -------------------------------------------------------------- the sender

    def report(self, name: str, error: IPCError) -> None:
        """A one-way message this end sent was not handled: log it, call ``on_error``."""
        if self.log is not None:
            self.log.warning("gunicorn-ext: a message %s sent was not handled: %s", self.where,
                             error)
        for fn in self._error_callbacks:
            try:
                fn(name, error)
            except Exception:
                if self.log is not None:
                    self.log.exception("gunicorn-ext: on_error callback failed")
