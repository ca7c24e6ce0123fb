"""Every gunicorn-ext setting, its default, and its validation, in one place.

Settings are keyword arguments of :func:`gunicorn_ext.enable`. A bad value
stops Gunicorn at startup with a message naming the setting.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class SettingsError(ValueError):
    """A gunicorn-ext setting has an invalid value."""


@dataclass(frozen=True)
class Settings:
    #: Largest bus frame accepted, in bytes. A bigger one closes the sender's
    #: connection with a logged reason.
    ipc_max_frame: int = 4 * 1024 * 1024
    #: Bytes the primary may queue for a worker that is not reading its bus
    #: before it gives up on that worker's connection.
    ipc_max_backlog: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool)):
                raise SettingsError(f"gunicorn-ext setting {f.name} must be an integer, got {value!r}")
        if not 1024 <= self.ipc_max_frame <= 1 << 30:
            raise SettingsError(
                f"gunicorn-ext setting ipc_max_frame must be between 1024 and 2**30 bytes, "
                f"got {self.ipc_max_frame}")
        if self.ipc_max_backlog < self.ipc_max_frame:
            raise SettingsError(
                "gunicorn-ext setting ipc_max_backlog must be at least ipc_max_frame "
                f"({self.ipc_max_frame}), got {self.ipc_max_backlog}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Settings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SettingsError(
                f"unknown gunicorn-ext setting(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}")
        return cls(**kwargs)
