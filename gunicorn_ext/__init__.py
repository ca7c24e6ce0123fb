"""gunicorn-ext: cluster features for stock Gunicorn.

In the Gunicorn config::

    import gunicorn_ext
    gunicorn_ext.enable(globals())          # last line

In the primary (config): ``gunicorn_ext.primary`` registers handlers and sends
to workers. In the app (workers): ``gunicorn_ext.worker`` sends to the primary
and to other workers, and registers handlers for what it receives.
"""

from .hooks import enable
from .ipc import (
    ALL,
    PRIMARY,
    BusClosed,
    FrameError,
    HandlerError,
    IPCError,
    Message,
    NoHandler,
    RequestTimeout,
    WorkerGone,
)
from .ipc.bus import Bus, worker
from .ipc.hub import Hub, primary
from .settings import Settings, SettingsError

__all__ = [
    "ALL",
    "PRIMARY",
    "Bus",
    "BusClosed",
    "FrameError",
    "HandlerError",
    "Hub",
    "IPCError",
    "Message",
    "NoHandler",
    "RequestTimeout",
    "Settings",
    "SettingsError",
    "WorkerGone",
    "enable",
    "primary",
    "worker",
]
