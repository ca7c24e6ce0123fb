"""Wire gunicorn-ext into Gunicorn's server hooks, around the user's own.

Gunicorn takes one callable per hook, so :func:`enable` wraps whatever hook
the config already defines: ours runs first (so the user's ``post_fork`` can
already use the bus), then theirs, with Gunicorn's own signature so its arity
check passes.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import Any

from . import gunicorn_internals as gi
from . import stopping
from .asgi import ClusterMiddleware, app_attribute
from .deadlines import Deadlines
from .dispatch import DispatchedListener, Dispatcher, dispatched
from .ipc.bus import worker as worker_bus
from .ipc.hub import primary
from .reporter import Reporter
from .settings import Settings
from .stacks import format_all_stacks
from .sticky import instance_route, pin_worker, route_name
from .supervisor import Supervisor
from .worker_record import slot_of

_MARK = "_gunicorn_ext_hook"

#: The arbiter's lifecycle manager (restart policy, rolling reload, status).
supervisor = Supervisor(primary)
#: This worker's reporter (None in the primary).
reporter: Reporter | None = None
#: The primary's connection dispatcher (even spread over workers).
dispatcher = Dispatcher(primary)
#: This worker's end of it (None in the primary, or when even_spread is off).
dispatched_listener: DispatchedListener | None = None
#: This worker's request deadlines (None in the primary, or when request_timeout is 0).
deadlines: Deadlines | None = None
#: The primary's admin HTTP endpoint (None unless ``admin_bind`` is set).
admin: Any = None
#: This worker's sticky route (None in the primary, or when sticky is off).
_route: str | None = None


# -- in the primary ---------------------------------------------------------------


def on_starting(server: Any) -> None:
    primary.start(server.log)
    s = supervisor.settings
    if s.bus_bridge_url:
        primary.start_bridge(s.bus_bridge_url, s.bus_bridge_name or _bridge_name(server))
    supervisor.install(server)
    if dispatched(server.worker_class.__name__, supervisor.settings.even_spread):
        dispatcher.install(server, server.log)
        supervisor.dispatcher = dispatcher  # drained on a graceful stop
    _start_admin(server)


def _start_admin(server: Any) -> None:
    """Serve ``admin_bind`` from the arbiter; exit at once (status 1) if it can't listen."""
    global admin
    s = supervisor.settings
    if not s.admin_bind or admin is not None:
        return
    from .admin import ENDPOINTS, AdminError, AdminServer
    from .settings import parse_address

    host, port = parse_address("admin_bind", s.admin_bind)
    endpoint = AdminServer(host, port, supervisor, server.log, allow_remote=s.admin_allow_remote)
    try:
        endpoint.start(take_over=gi.old_master_pid(server))
    except AdminError as exc:
        server.log.error("gunicorn-ext: %s; shutting down", exc)
        server.halt(exit_status=1)  # Gunicorn's own exit: pidfile removed, on_exit run
    admin = endpoint
    h, p = admin.address
    if admin.listening:
        server.log.info("gunicorn-ext: admin endpoint on http://%s:%s (%s)",
                        f"[{h}]" if ":" in h else h, p, " ".join(ENDPOINTS))


def _bridge_name(server: Any) -> str:
    """Gunicorn's proc_name (default: the app, ``app:app``) as a bridge name."""
    name = re.sub(r"[^A-Za-z0-9_.:-]", "_", str(server.cfg.proc_name or "gunicorn"))
    return name[:100]


def on_exit(server: Any) -> None:
    global admin
    if admin is not None:
        admin.close()
        admin = None
    supervisor.stop()
    primary.stop()


def pre_fork(server: Any, worker: Any) -> None:
    """Give the new worker its slot (a replacement takes the dead one's) and its bus."""
    slot = supervisor.assign_slot(server, worker)
    primary.prepare_fork(slot, worker)
    dispatcher.prepare_fork(server, worker)


def child_exit(server: Any, worker: Any) -> None:
    supervisor.worker_exited(server, worker)
    primary.worker_exited(worker)
    dispatcher.worker_exited(worker)


def on_reload(server: Any) -> None:
    """HUP: every running worker is about to be replaced; free their slots.

    A rolling HUP (``hup="rolling"``) replaces them one batch at a time instead."""
    if supervisor.hup_rolling:
        return
    supervisor.retire_all(server)


def nworkers_changed(server: Any, new: int, old: int | None) -> None:
    """On scale-down, make Gunicorn stop the highest slots, keeping slots 0..N-1."""
    if old is None or new >= old:
        return
    supervisor.scale_down(server, new)


# -- in the worker ----------------------------------------------------------------


def post_fork(server: Any, worker: Any) -> None:
    global reporter, dispatched_listener
    dispatched_listener = dispatcher.child_listener(worker)
    if dispatched_listener is not None:
        _stop_dispatch_on_exit_signal(worker, dispatched_listener)
    end = primary.child_end
    primary.child_end = None
    if end is not None:
        sock, push, slot = end
        worker_bus.attach(sock, push, slot, primary.handler_names, worker.log, primary.max_frame)
        reporter = Reporter(worker_bus, supervisor.settings, worker.log)
    s = supervisor.settings
    if s.worker_ports_base:
        from .worker_ports import bind_host, open_worker_port

        host = s.worker_ports_host or bind_host(list(worker.cfg.bind))
        port = s.worker_ports_base + slot_of(worker)
        if open_worker_port(worker, host, port):
            # RouteCookie() built at app import in this worker then names this worker's port.
            os.environ["GX_ROUTE"] = route_name(f"{host}:{port}")
    if s.sticky_on:
        _choose_route(worker)


def _choose_route(worker: Any) -> None:
    """Decide this worker's route (post_worker_init pins the app to it): its own port's
    (GX_ROUTE, set above), else the instance's; also for a RouteCookie() of the app."""
    global _route
    try:
        _route = instance_route(list(worker.cfg.bind))
    except ValueError as exc:
        worker.log.error("gunicorn-ext: no sticky route cookie (%s); set GX_ROUTE, or "
                         "sticky=False", exc)
        return
    os.environ["GX_ROUTE"] = _route


def _stop_dispatch_on_exit_signal(worker: Any, dl: DispatchedListener) -> None:
    """TERM (graceful stop) tells the primary at once to send this worker nothing more."""
    gi.on_exit_signal(worker, dl.stop_soon)


def post_worker_init(worker: Any) -> None:
    global deadlines
    asgi_attr = app_attribute(worker)
    loop = gi.event_loop_of(worker)  # -k asgi makes its loop first; uvicorn's comes later
    if asgi_attr is not None and loop is not None and worker_bus.connected:
        worker_bus.bind_loop(loop)
    # An ASGI worker is ready once its app's lifespan startup completed (ClusterMiddleware).
    lifespan = gi.asgi_lifespan(worker) if asgi_attr is not None else "off"
    worker_bus.start(ready=lifespan == "off")
    if _route is not None:  # the app is loaded (worker.wsgi): put the route cookie around it
        pin_worker(worker, _route, supervisor.settings.sticky_cookie)
    timeout = supervisor.settings.request_timeout
    if asgi_attr is not None:
        # The request hooks do nothing in ASGI workers (the uvicorn worker calls none): this counts.
        _default_request_hooks(worker)
        stall = max(1.0, min(worker.cfg.timeout / 2, 10.0)) if worker.cfg.timeout else 0.0
        gi.set_app(worker, ClusterMiddleware(
            gi.app_of(worker, asgi_attr), worker_bus, reporter, stall, worker.log, worker,
            ready=None if lifespan == "off" else worker_bus.report_ready,
            lifespan_required=lifespan == "on").asgi, asgi_attr)
        if timeout:
            worker.log.info("gunicorn-ext: request_timeout is not enforced under %s (an "
                            "asyncio worker); use asyncio.timeout() in the app",
                            type(worker).__name__)
    else:
        stopping.watch_wsgi(worker, worker.log)  # Socket.IO managers' on_stop callbacks
    if asgi_attr is None and timeout and reporter is not None:
        deadlines = Deadlines(timeout, worker, reporter.recycle,
                              lambda: worker_exit(None, worker), worker.log)
        gi.set_app(worker, deadlines.wrap(gi.app_of(worker)))  # the app is loaded
        deadlines.start()
    if asgi_attr is None:
        _fast_request_hooks(worker)
    if reporter is not None:
        reporter.start()
    if dispatched_listener is not None:
        dispatched_listener.ready()


def _fast_request_hooks(worker: Any) -> None:
    """Make this worker's request hook bodies; where a hook is ours alone (no user hook
    composed with it), Gunicorn calls the body directly, saving a call per request.
    Gunicorn reads ``cfg.pre_request``/``cfg.post_request`` on every request."""
    global _pre, _post
    _pre, _post = _request_hooks(worker)
    settings = worker.cfg.settings
    for name, ours, body in (("pre_request", pre_request, _pre),
                             ("post_request", post_request, _post)):
        if name in settings and getattr(worker.cfg, name, None) is ours:
            worker.cfg.set(name, body)


def _default_request_hooks(worker: Any) -> None:
    """Under ``-k asgi``, give Gunicorn back its default request hooks where ours stand alone.

    Ours do nothing there (:class:`ClusterMiddleware` counts), and Gunicorn internals:
    Gunicorn 27's ASGI protocol (``gunicorn/asgi/protocol.py``) waits for every app call
    to return before reading the next request of a connection whenever a ``post_request``
    hook is set, and calls a set ``pre_request`` on every request: with ours in place a
    keep-alive hello world ran at about 70% of plain. It reads both hooks per connection,
    after this. A user's own hook (composed with ours) is kept, and so is that cost.
    """
    settings = worker.cfg.settings
    for name, ours in (("pre_request", pre_request), ("post_request", post_request)):
        if name in settings and getattr(worker.cfg, name, None) is ours:
            worker.cfg.set(name, settings[name].default)


def pre_request(worker: Any, req: Any) -> None:
    _pre(worker, req)


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    _post(worker, req, environ, resp)


def _no_pre(worker: Any, req: Any) -> None:
    pass


def _no_post(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    pass


#: The bodies of pre_request/post_request in this worker (made by _request_hooks at
#: post_worker_init; none in an ASGI worker, where ClusterMiddleware counts).
_pre: Callable[[Any, Any], None] = _no_pre
_post: Callable[[Any, Any, Any, Any], None] = _no_post


#: WSGI worker classes that run every request on the worker's main (real) thread.
_ONE_THREAD = ("SyncWorker", "GeventWorker", "GeventPyWSGIWorker")


def _request_hooks(worker: Any) -> tuple[Callable[[Any, Any], None],
                                         Callable[[Any, Any, Any, Any], None]]:
    """pre_request and post_request for this WSGI worker, with what they use bound.

    They run on every request, so each is one Python call (plus the latency bucket's
    ``_Cell.finish``): the request's counts go to the calling thread's cell, its start
    time rides on Gunicorn's ``req`` (Gunicorn passes the same object to both hooks; a
    context variable cost more), the request deadline's entry is dropped, one-way bus
    messages the request batched are sent, and the soft memory limit is checked (at most
    every ``RSS_CHECK_GAP``).
    """
    rep = reporter
    dl = dispatched_listener
    if rep is None:  # no bus: nothing is counted (and no deadlines); even spread still is
        if dl is None:
            return _no_pre, _no_post

        def post_dl(worker: Any, req: Any, environ: Any, resp: Any) -> None:
            if not worker.alive:
                dl.stop_soon()
            dl.finished()

        return _no_pre, post_dl
    from time import perf_counter

    from .metrics import _get_ident

    cells = rep.stats._cells  # by real thread ident; a thread's first request makes its cell
    new_cell = rep.stats.thread_cell
    flush = worker_bus.flush
    # One-way messages the request batched: flush() only when there are any (one call
    # fewer per request).
    obuf = worker_bus.batched
    limit = bool(rep.settings.memory_soft_limit)
    # The request deadline's entry, by thread (greenlet under gevent; sync: this thread).
    drop: Any = None
    key: Any = None
    if deadlines is not None:
        drop = deadlines._inflight.pop
        key = deadlines.green or threading.get_ident

    if type(worker).__name__ in _ONE_THREAD:
        # sync and gevent serve every request on this (the main, real) thread: its cell
        # is bound once, and so is a sync worker's deadline key.
        cell = new_cell()
        ident = threading.get_ident() if key is threading.get_ident else None

        def pre_main(worker: Any, req: Any) -> None:
            req.gunicorn_ext_t0 = perf_counter()
            cell.started += 1

        def post_main(worker: Any, req: Any, environ: Any, resp: Any) -> None:
            if drop is not None:
                drop(key() if ident is None else ident, None)
            if obuf:
                flush()  # one-way messages batched during the request leave with it
            now = perf_counter()
            try:
                t0 = req.gunicorn_ext_t0
            except AttributeError:
                t0 = now
            cell.finish(now - t0)
            if limit and now >= rep.next_rss_check:
                rep.after_request(now)  # the soft memory limit
            if dl is not None:
                if not worker.alive:  # max_requests, memory recycling: stopping after this
                    dl.stop_soon()
                dl.finished()

        return pre_main, post_main

    # gthread: a request thread looks its cell up by its ident, which is also the
    # deadline's key (unless gevent patched threading: then the greenlet is).
    by_tid = key is None or key is _get_ident
    threaded = dl is not None and dl.threaded

    def pre(worker: Any, req: Any) -> None:
        req.gunicorn_ext_t0 = perf_counter()
        (cells.get(_get_ident()) or new_cell()).started += 1

    def post(worker: Any, req: Any, environ: Any, resp: Any) -> None:
        tid = _get_ident()
        if drop is not None:
            drop(tid if by_tid else key(), None)
        if obuf:
            flush()  # one-way messages batched during the request leave with it
        now = perf_counter()
        try:
            t0 = req.gunicorn_ext_t0
        except AttributeError:
            t0 = now
        (cells.get(tid) or new_cell()).finish(now - t0)
        if limit and now >= rep.next_rss_check:
            rep.after_request(now)  # the soft memory limit
        if dl is not None:
            if not worker.alive:  # max_requests, memory recycling: stopping after this request
                dl.stop_soon()
            if threaded:
                dl.served += 1  # DispatchedListener.finished() of a gthread worker, inlined
            else:
                dl.finished()

    return pre, post


def worker_abort(worker: Any) -> None:
    """SIGABRT from the arbiter's timeout: log every thread's stack before dying."""
    worker.log.critical(
        "gunicorn-ext: worker slot %s (pid %s) timed out; stacks of all its threads:\n%s",
        worker_bus.slot, worker.pid, format_all_stacks())
    if reporter is not None:
        reporter.tell_exit(f"timed out (no heartbeat for {worker.cfg.timeout}s), killed by the "
                           "arbiter", planned=False)


def worker_exit(server: Any, worker: Any) -> None:
    if dispatched_listener is not None:
        dispatched_listener.close()  # hands back connections it never accepted
    if reporter is not None:
        reporter.worker_exit(worker)


_OURS: dict[str, Callable[..., None]] = {
    "on_starting": on_starting,
    "on_exit": on_exit,
    "pre_fork": pre_fork,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "pre_request": pre_request,
    "post_request": post_request,
    "worker_abort": worker_abort,
    "worker_exit": worker_exit,
    "child_exit": child_exit,
    "on_reload": on_reload,
    "nworkers_changed": nworkers_changed,
}


def _compose(name: str, ours: Callable[..., None], theirs: Callable[..., None] | None) -> Any:
    if theirs is None or getattr(theirs, _MARK, False):
        return ours
    # Explicit signatures: Gunicorn checks each hook's arity.
    n = ours.__code__.co_argcount
    fn: Any
    if n == 1:
        def fn(a: Any) -> None:
            ours(a)
            theirs(a)
    elif n == 2:
        def fn(a: Any, b: Any) -> None:
            ours(a, b)
            theirs(a, b)
    elif n == 3:
        def fn(a: Any, b: Any, c: Any) -> None:
            ours(a, b, c)
            theirs(a, b, c)
    else:
        def fn(a: Any, b: Any, c: Any, d: Any) -> None:
            ours(a, b, c, d)
            theirs(a, b, c, d)
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
    supervisor.configure(s)
    for name, ours in _OURS.items():
        hook = _compose(name, ours, config.get(name))
        setattr(hook, _MARK, True)
        config[name] = hook
    return s
