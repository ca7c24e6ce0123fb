"""Every thread's stack, formatted for the log (hung-worker diagnostics)."""

from __future__ import annotations

import sys
import threading
import traceback


def format_all_stacks() -> str:
    """The current stack of every thread of this process, main thread first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    frames = sys._current_frames()
    parts = []
    for ident in sorted(frames, key=lambda i: (i != main, i)):
        name = names.get(ident, "?")
        stack = "".join(traceback.format_stack(frames[ident]))
        parts.append(f"Thread {name} (id {ident}):\n{stack}")
    return "\n".join(parts)
