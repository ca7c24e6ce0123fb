"""gunicorn-ext: cluster features for stock Gunicorn.

In the Gunicorn config::

    import gunicorn_ext
    gunicorn_ext.enable(globals())          # last line

In the primary (config): ``gunicorn_ext.primary`` registers handlers and sends
to workers. In the app (workers): ``gunicorn_ext.worker`` sends to the primary
and to other workers, and registers handlers for what it receives.

Names are imported on first use, so ``gunicorn-ext status`` starts without
loading the server side (prometheus_client, the hooks).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The package version, in this one place (pyproject.toml reads it; CHANGES.md records it).
__version__ = "0.2.0.dev0"

if TYPE_CHECKING:
    from .hooks import enable
    from .ipc import (
        ALL,
        PRIMARY,
        BridgeDown,
        BusClosed,
        FrameError,
        HandlerError,
        IPCError,
        Message,
        MessageTooLarge,
        NoHandler,
        RequestTimeout,
        UnencodableMessage,
        WorkerGone,
    )
    from .ipc.bus import Bus, worker
    from .ipc.hub import Hub, primary
    from .settings import Settings, SettingsError

_WHERE = {
    "enable": ".hooks",
    "Bus": ".ipc.bus",
    "worker": ".ipc.bus",
    "Hub": ".ipc.hub",
    "primary": ".ipc.hub",
    "Settings": ".settings",
    "SettingsError": ".settings",
    **{name: ".ipc" for name in ("ALL", "PRIMARY", "BridgeDown", "BusClosed", "FrameError", "HandlerError",
                                 "IPCError", "Message", "MessageTooLarge", "NoHandler",
                                 "RequestTimeout", "UnencodableMessage", "WorkerGone")},
}

__all__ = [
    "__version__", "ALL", "PRIMARY", "BridgeDown", "Bus", "BusClosed", "FrameError", "HandlerError", "Hub",
    "IPCError", "Message", "MessageTooLarge", "NoHandler", "RequestTimeout", "Settings",
    "SettingsError", "UnencodableMessage", "WorkerGone",
    "enable", "primary", "worker",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'gunicorn_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
