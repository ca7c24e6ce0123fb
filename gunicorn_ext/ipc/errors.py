"""Errors a bus call can raise.

Every way a message can fail to be handled has its own class, so callers can
tell "nobody listens for that" from "the worker died" from "it was too slow".
All of them derive from :class:`IPCError`.
"""

from __future__ import annotations


class IPCError(Exception):
    """Base class of every bus error."""

    #: Short machine-readable code carried in error frames.
    code = "ipc_error"


class NoHandler(IPCError):
    """The receiving side has no handler registered for the message name."""

    code = "no_handler"


class HandlerError(IPCError):
    """The receiving side's handler raised; the message holds its type and text."""

    code = "handler_error"


class RequestTimeout(IPCError, TimeoutError):
    """No reply arrived before the request's timeout."""

    code = "timeout"


class WorkerGone(IPCError):
    """The addressed worker is not running, or exited before replying."""

    code = "worker_gone"


class BusClosed(IPCError):
    """This process's connection to the bus is closed (or it never had one)."""

    code = "bus_closed"


class FrameError(IPCError):
    """A frame received was oversized, malformed, or of an unknown type."""

    code = "bad_frame"


class MessageTooLarge(IPCError):
    """The encoded message is over ``ipc_max_frame``: refused by its sender,
    before anything was written (the connection stays open)."""

    code = "too_large"


class UnencodableMessage(IPCError):
    """The payload is not a msgpack value (an int beyond 64 bits, an unsupported
    type, a string with lone surrogates, nesting too deep): refused by its sender,
    before anything was written (the connection stays open)."""

    code = "unencodable"


class BridgeDown(IPCError):
    """A publication reached this instance only: the bus bridge to the other
    instances (``bus_bridge_url``) is down, or its send backlog is full."""

    code = "bridge_down"


_BY_CODE: dict[str, type[IPCError]] = {
    cls.code: cls
    for cls in (IPCError, NoHandler, HandlerError, RequestTimeout, WorkerGone, BusClosed, FrameError,
                MessageTooLarge, UnencodableMessage, BridgeDown)
}


def error_from_code(code: str, message: str) -> IPCError:
    """Rebuild the exception a peer reported in an error frame."""
    return _BY_CODE.get(code, IPCError)(message)
