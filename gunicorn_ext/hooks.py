"""Wire gunicorn-ext into Gunicorn's server hooks, around the user's own.

Gunicorn takes one callable per hook, so :func:`enable` wraps whatever hook
the config already defines: ours runs first (so the user's ``post_fork`` can
already use the bus), then theirs, with Gunicorn's own signature so its arity
check passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from .ipc.bus import worker as worker_bus
from .ipc.hub import primary
from .settings import Settings

_MARK = "_gunicorn_ext_hook"


def _slot_of(w: Any) -> int | None:
    return getattr(w, "ext_slot", None)


def on_starting(server: Any) -> None:
    primary.start(server.log)


def on_exit(server: Any) -> None:
    primary.stop()


def pre_fork(server: Any, worker: Any) -> None:
    """Give the new worker the lowest free slot, so a replacement takes the dead one's."""
    used = {
        _slot_of(w) for w in server.WORKERS.values() if not getattr(w, "ext_retired", False)
    }
    slot = next(i for i in itertools.count() if i not in used)
    worker.ext_slot = slot
    worker.ext_retired = False
    primary.prepare_fork(slot, worker)


def post_fork(server: Any, worker: Any) -> None:
    end = primary.child_end
    primary.child_end = None
    if end is not None:
        sock, push, slot = end
        worker_bus.attach(sock, push, slot, primary.handler_names, worker.log, primary.max_frame)


def post_worker_init(worker: Any) -> None:
    worker_bus.start()


def child_exit(server: Any, worker: Any) -> None:
    primary.worker_exited(worker)


def on_reload(server: Any) -> None:
    """HUP: every running worker is about to be replaced; free their slots."""
    old = list(server.WORKERS.values())
    for w in old:
        w.ext_retired = True
    primary.retire(old)


def nworkers_changed(server: Any, new: int, old: int | None) -> None:
    """On scale-down, make Gunicorn stop the highest slots, keeping slots 0..N-1.

    Gunicorn stops the workers with the lowest ``age`` first, so the ones to go
    get ages below everyone else's.
    """
    if old is None or new >= old:
        return
    live = [w for w in server.WORKERS.values() if not getattr(w, "ext_retired", False)]
    extra = len(live) - new
    if extra <= 0:
        return
    floor = min(w.age for w in server.WORKERS.values())
    victims = sorted(live, key=lambda w: _slot_of(w) or 0, reverse=True)[:extra]
    for i, w in enumerate(victims):
        w.age = floor - 1 - i
        w.ext_retired = True
    primary.retire(victims)


_OURS: dict[str, Callable[..., None]] = {
    "on_starting": on_starting,
    "on_exit": on_exit,
    "pre_fork": pre_fork,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "child_exit": child_exit,
    "on_reload": on_reload,
    "nworkers_changed": nworkers_changed,
}


def _compose(name: str, ours: Callable[..., None], theirs: Callable[..., None] | None) -> Any:
    if theirs is None or getattr(theirs, _MARK, False):
        return ours
    # Explicit signatures: Gunicorn checks each hook's arity.
    if ours.__code__.co_argcount == 1:
        def hook1(a: Any) -> None:
            ours(a)
            theirs(a)
        fn: Any = hook1
    elif ours.__code__.co_argcount == 2:
        def hook2(a: Any, b: Any) -> None:
            ours(a, b)
            theirs(a, b)
        fn = hook2
    else:
        def hook3(a: Any, b: Any, c: Any) -> None:
            ours(a, b, c)
            theirs(a, b, c)
        fn = hook3
    fn.__name__ = name
    return fn


def enable(config: dict[str, Any], **settings: Any) -> Settings:
    """Turn gunicorn-ext on from a Gunicorn config module.

    Call it as the config's last line, ``gunicorn_ext.enable(globals())``, so
    every hook the config defines above it is kept and runs after ours.
    Keyword arguments are settings (see :class:`gunicorn_ext.settings.Settings`);
    a bad one raises :class:`~gunicorn_ext.settings.SettingsError` at startup.
    """
    s = Settings.from_kwargs(settings)
    primary.max_frame = s.ipc_max_frame
    primary.max_backlog = s.ipc_max_backlog
    for name, ours in _OURS.items():
        hook = _compose(name, ours, config.get(name))
        setattr(hook, _MARK, True)
        config[name] = hook
    return s
