"""What a bus handler receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

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
