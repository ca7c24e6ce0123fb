"""Primary <-> worker messaging: the hub runs in the arbiter, the bus in each worker."""

from .errors import (
    BridgeDown,
    BusClosed,
    FrameError,
    HandlerError,
    IPCError,
    MessageTooLarge,
    NoHandler,
    RequestTimeout,
    UnencodableMessage,
    WorkerGone,
)
from .frames import ALL, PRIMARY
from .message import Message

__all__ = [
    "ALL",
    "PRIMARY",
    "BridgeDown",
    "BusClosed",
    "FrameError",
    "HandlerError",
    "IPCError",
    "Message",
    "MessageTooLarge",
    "NoHandler",
    "RequestTimeout",
    "UnencodableMessage",
    "WorkerGone",
]
