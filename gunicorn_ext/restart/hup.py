"""Rolling HUP: which setting changes a re-read config may not bring.

A rolling reload keeps the primary, its listeners, its dispatcher and its bus, and
replaces only workers; a setting those depend on can't change without a restart.
:func:`restart_only_changes` names the ones a re-read config changed, so SIGHUP can
refuse it (one log line) and keep the config in use. The arbiter side (re-reading
the config, starting the rollout) is in supervisor.py.
"""

from __future__ import annotations

from typing import Any

from ..settings import Settings

#: Gunicorn settings the arbiter applies once, at start: (setting name, why).
GUNICORN_RESTART_ONLY = {
    "bind": "the listeners are opened once",
    "worker_class": "the primary dispatches to one kind of worker",
    "reuse_port": "the listeners are opened once",
    "daemon": "the primary detaches once",
    "user": "the primary's user is set once",
    "group": "the primary's group is set once",
}
#: gunicorn-ext settings the primary applies once, at start.
EXT_RESTART_ONLY = {
    "even_spread": "the dispatcher is set up once",
    "control_socket": "the control socket is opened once",
    "ipc_max_frame": "the bus is set up once",
    "ipc_max_backlog": "the bus is set up once",
    "memory_check_interval": "the sampling timer is set up once",
    "admin_bind": "the admin endpoint is opened once",
    "admin_allow_remote": "the admin endpoint is opened once",
}


def _value(cfg: Any, name: str) -> Any:
    if name == "worker_class":  # the class Gunicorn resolves (threads > 1 turns sync into gthread)
        return getattr(cfg.worker_class, "__name__", cfg.worker_class_str)
    if name == "bind":
        return list(cfg.bind)
    return cfg.settings[name].get() if name in cfg.settings else None


def restart_only_changes(old_cfg: Any, new_cfg: Any, old: Settings, new: Settings) -> list[str]:
    """``"name: old -> new"`` for each setting that needs a restart and changed."""
    changes = []
    for name in GUNICORN_RESTART_ONLY:
        a, b = _value(old_cfg, name), _value(new_cfg, name)
        if a != b:
            changes.append(f"{name}: {a!r} -> {b!r}")
    for name in EXT_RESTART_ONLY:
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            changes.append(f"{name}: {a!r} -> {b!r}")
    return changes
