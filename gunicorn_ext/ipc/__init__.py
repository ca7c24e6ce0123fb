"""Primary <-> worker messaging: the hub runs in the arbiter, the bus in each worker."""

from .errors import (
    BusClosed,
    FrameError,
    HandlerError,
    IPCError,
    NoHandler,
    RequestTimeout,
    WorkerGone,
)
from .frames import ALL, PRIMARY
from .message import Message

__all__ = [
    "ALL",
    "PRIMARY",
    "BusClosed",
    "FrameError",
    "HandlerError",
    "IPCError",
    "Message",
    "NoHandler",
    "RequestTimeout",
    "WorkerGone",
]
