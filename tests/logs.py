"""A logger for in-process servers under test (hub, bridge, control socket): keeps every line."""

from __future__ import annotations

import threading
from typing import Any


class RecordingLog:
    """Gunicorn's logger methods; each call kept as ``(level, text)``, from any thread."""

    def __init__(self) -> None:
        self._records: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _add(self, level: str, msg: str, *args: Any) -> None:
        with self._lock:
            self._records.append((level, msg % args if args else msg))

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        self._add("debug", msg, *args)

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        self._add("info", msg, *args)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._add("warning", msg, *args)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._add("error", msg, *args)

    def exception(self, msg: str, *args: Any, **kw: Any) -> None:
        self._add("exception", msg, *args)

    def critical(self, msg: str, *args: Any, **kw: Any) -> None:
        self._add("critical", msg, *args)

    @property
    def lines(self) -> list[tuple[str, str]]:
        """Every ``(level, text)`` so far."""
        with self._lock:
            return list(self._records)

    def at(self, level: str) -> list[str]:
        """The texts logged at ``level``."""
        return [text for lv, text in self.lines if lv == level]

    def count(self, needle: str) -> int:
        """How many lines, at any level, contain ``needle``."""
        return sum(needle in text for _, text in self.lines)
