"""What a bus handler receives, and the one way both ends of the bus run handlers
and subscribers.

The primary (``ipc/hub.py``) and every worker (``ipc/bus.py``) keep their handlers
in a :class:`Handlers`: it registers them, runs the handler for a request or a
one-way message (sync, or ``async def`` on a worker's event loop), maps what
happened to the frame that goes back (a :class:`~gunicorn_ext.ipc.frames.Rep`, or
an :class:`~gunicorn_ext.ipc.frames.Err` with the error's code), logs a handler's
failure in the receiver, and, at the sender, hands failure notices to the
``on_error`` callbacks. They keep their subscribers in a :class:`Subscribers`,
which registers them and delivers a publication to each. Only the transport
differs between the two ends (and the hub's routing of a publication to the
subscribed workers, which is the hub's own).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
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
#: A subscriber takes the publication (a :class:`Message` named after its topic).
Subscriber = Callable[[Message], Any]


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


class Subscribers:
    """The subscribers of one end of the bus, by topic, and how a publication reaches them.

    ``where`` and ``allow_async`` as for :class:`Handlers`. ``run_async(awaitable,
    topic)``, set by a worker's bus, runs what an ``async def`` subscriber returned on
    the worker's event loop (awaited with :meth:`arun`).
    """

    def __init__(self, where: str, allow_async: bool) -> None:
        self.where = where
        self.log: Any = None
        self.allow_async = allow_async
        self.run_async: Callable[[Awaitable[Any], str], None] | None = None
        #: topic -> its subscribers, in the order registered (changed by add/remove only).
        self.topics: dict[str, list[Subscriber]] = {}

    def add(self, topic: str, fn: Subscriber) -> bool:
        """Deliver ``topic`` to ``fn`` too from now on; True when nobody had it before."""
        if inspect.iscoroutinefunction(fn) and not self.allow_async:
            raise TypeError(f"{self.where} runs its subscribers in its hub thread, which has "
                            f"no event loop: the subscriber of {topic!r} can't be async def")
        first = topic not in self.topics
        self.topics.setdefault(topic, []).append(fn)
        return first

    def remove(self, topic: str) -> bool:
        """Drop every subscriber of ``topic``; True when it had any."""
        return self.topics.pop(topic, None) is not None

    def deliver(self, topic: str, payload: Any, src: int) -> None:
        """Call each subscriber of ``topic`` with the publication, in this thread; one
        that raises is logged with its traceback and the others still get it."""
        fns = self.topics.get(topic)
        if not fns:
            return
        for fn in list(fns):
            try:
                result = fn(Message(topic, payload, src))
                if inspect.isawaitable(result):
                    self._awaitable(result, topic)
            except Exception:
                self._raised(topic)

    async def arun(self, result: Awaitable[Any], topic: str) -> None:
        """Await what an ``async def`` subscriber of ``topic`` returned (on the loop)."""
        try:
            await result
        except Exception:
            self._raised(topic)

    def _awaitable(self, result: Awaitable[Any], topic: str) -> None:
        if self.run_async is not None:
            self.run_async(result, topic)
            return
        close = getattr(result, "close", None)
        if close is not None:
            close()  # a coroutine nothing will run: no "never awaited" warning
        if self.log is not None:
            self.log.error("gunicorn-ext: a subscriber of %r in %s returned an awaitable; %s "
                           "has no event loop to run it", topic, self.where, self.where)

    def _raised(self, topic: str) -> None:
        # Called in the except block, so the log line carries the traceback.
        if self.log is not None:
            self.log.exception("gunicorn-ext: subscriber of %r in %s raised", topic, self.where)
