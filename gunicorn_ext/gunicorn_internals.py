"""The one seam to Gunicorn's ``Arbiter`` and ``Worker``: everything gunicorn-ext touches there.

Gunicorn's hook API hands hooks the arbiter and the worker objects themselves, but
documents little of them, and gives no hook that can delay a spawn, see an exit
status, or keep a worker in place. What gunicorn-ext needs beyond the documented
hooks is done here and nowhere else, so a Gunicorn upgrade is checked against this
file. Checked, by reading ``gunicorn/arbiter.py`` and ``gunicorn/workers/base.py``
and by the real-Gunicorn tests, on Gunicorn **25.0.0** (``make test-oldest``) and
**27.0.1** (``make test``); :func:`wrap_arbiter` refuses an older one at startup
(versions.py).

Public names, used as Gunicorn means them: ``Arbiter.num_workers`` (read),
``Arbiter.wakeup()``, ``Arbiter.kill_workers()``, ``Arbiter.WORKER_BOOT_ERROR`` and
``Arbiter.APP_LOAD_ERROR``, ``Arbiter.halt()``, ``Arbiter.log``/``cfg``/``app``/``pid``/
``timeout``/``worker_class``,
``Worker.pid``/``log``/``cfg``/``alive``, ``gunicorn.errors.HaltServer``,
``gunicorn.pidfile.Pidfile``.

Internals touched, each for one reason:

* ``Arbiter.spawn_worker``, ``reap_workers``, ``manage_workers``, ``stop`` and
  ``handle_hup`` are wrapped on the running instance (:func:`wrap_arbiter`): no hook
  can veto or delay a spawn (backoff, breaker), see an exit status, run operator
  actions in the main thread, drain the backlog before a stop, or replace HUP.
* ``Arbiter.WORKERS`` (pid -> Worker) and ``Arbiter.LISTENERS`` are read
  (:func:`workers`, :func:`worker_for`, :func:`listeners`); a listener's
  ``sock``, ``conf.backlog`` and ``cfg_addr`` are read (:func:`listener_socket`,
  :func:`listener_backlog`, :func:`listener_port`) so restart/gate.py can stop and
  resume its socket in place.
* ``os.waitid(..., WNOWAIT)`` peeks at a worker's exit status before
  ``reap_workers`` reaps it (:func:`peek_exit`): ``child_exit`` is not given it.
* The tail of ``reap_workers`` is replayed by hand (:func:`reap_past_boot_errors`):
  on a boot error (exit code ``WORKER_BOOT_ERROR``/``APP_LOAD_ERROR``) Gunicorn
  raises ``HaltServer`` before it closes the worker's ``tmp`` and runs
  ``child_exit``; 25.0.0 raises even before it pops the worker from ``WORKERS``,
  27.0.1 after. With ``halt_on_boot_error=False`` (or during a rolling reload) the
  replay pops, closes, calls ``child_exit``, and Gunicorn's loop goes on.
* ``Arbiter._num_workers`` is raised for one ``manage_workers`` call while a rolling
  reload's old workers still serve (:func:`counting_extra`): the public
  ``num_workers`` setter would call the ``nworkers_changed`` hook (the user's too)
  for a change that is not one.
* ``Worker.age`` is rewritten to choose which workers ``manage_workers`` stops on a
  scale-down (TTOU, ``gunicorn-ext scale``): it stops the lowest ages first
  (:func:`stop_first`).
* ``Worker.aborted`` (set by ``murder_workers`` before its SIGABRT) tells a timeout
  from another kill (:func:`timed_out`); ``Worker.tmp`` is closed by the replay.
* ``Arbiter.reexec_pid``/``master_pid`` tell that another master shares the
  listeners after USR2 (:func:`shares_listeners`, :func:`old_master_pid`); ``dirty_arbiter_pid`` and
  ``kill_dirty_arbiter()`` forward a rolling HUP to the dirty arbiter, as
  ``handle_hup`` does (both versions).
* The first part of ``Arbiter.reload()`` is replayed for a rolling HUP
  (:func:`reset_environment`, :func:`reread_config`, :func:`apply_config`,
  :func:`renew_pidfile`): ``cfg.env``/``env_orig``, ``app.reload()``, ``setup()``,
  ``log.reopen_files()``, ``cfg.on_reload()``, ``pidfile``; not its spawn-all/kill-all.
* One attribute, ``Worker.gunicorn_ext``, references the supervisor's record of the
  worker (:func:`attach`, :func:`attached`; worker_record.py holds everything else).
* In the worker: ``Worker.handle_exit`` (the bound SIGTERM handler, installed after
  ``post_fork``) is wrapped (:func:`on_exit_signal`); the loaded app in
  ``Worker.wsgi`` (or ``Worker.asgi`` for ``-k asgi``) is replaced after
  ``post_worker_init`` has it (:func:`app_of`, :func:`set_app`); ``Worker.sockets``
  is replaced or extended in ``post_fork`` (:func:`set_sockets`); ``-k asgi``'s
  ``Worker.loop`` is read in ``post_worker_init`` (:func:`event_loop_of`).
* For request deadlines (deadlines.py): the ``start_response`` a WSGI worker passes
  the app is its ``Response.start_response``, which sets ``Response.status`` (None
  before): read to tell whether the app began its response (:func:`wsgi_responded`),
  instead of wrapping ``start_response`` on every request.
* In a gthread worker, for even spread (dispatch.py): ``ThreadWorker.enqueue_req``
  and ``finish_request`` are wrapped on the instance, to count the connections that
  hold or wait for a thread (:func:`count_busy`); ``ThreadWorker.nr_conns`` is read
  (:func:`gthread_connections`); to close a kept-alive connection of a worker busier
  than its siblings, ``ThreadWorker.handle_request`` is wrapped on the instance until
  one request was answered with a close (:func:`close_one`), and
  ``Request.req_number``, ``headers``, ``should_close()`` and ``force_close()`` are
  used (:func:`may_close_after`); ``ThreadWorker.handle`` is wrapped on the instance and a
  finished ``TConn``'s ``close`` called in its request thread, then replaced by a
  no-op, so the main thread never waits on a client's close
  (:func:`close_in_request_thread`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol

from gunicorn.arbiter import Arbiter
from gunicorn.errors import HaltServer

from .versions import check_gunicorn

#: Gunicorn's exit code of a worker that failed to boot.
WORKER_BOOT_ERROR: int = Arbiter.WORKER_BOOT_ERROR
#: Gunicorn's exit code of a worker whose app failed to load.
APP_LOAD_ERROR: int = Arbiter.APP_LOAD_ERROR
#: The boot error exit codes, with what they mean.
BOOT_ERRORS: dict[int, str] = {WORKER_BOOT_ERROR: "worker failed to boot",
                               APP_LOAD_ERROR: "app failed to load"}
#: The arbiter methods :func:`wrap_arbiter` wraps.
WRAPPED = ("spawn_worker", "reap_workers", "manage_workers", "stop", "handle_hup")
#: The one attribute stamped on Gunicorn's Worker objects.
ATTRIBUTE = "gunicorn_ext"


class GunicornWorker(Protocol):
    """What gunicorn-ext uses of a ``gunicorn.workers.base.Worker``."""

    pid: Any  # "[booting]" until fork() returns, then the pid
    age: int
    aborted: bool
    alive: bool
    cfg: Any
    log: Any
    tmp: Any
    sockets: list[Any]


class GunicornArbiter(Protocol):
    """What gunicorn-ext uses of a ``gunicorn.arbiter.Arbiter``."""

    WORKERS: dict[int, Any]
    LISTENERS: list[Any]
    cfg: Any
    log: Any
    app: Any
    pid: int
    pidfile: Any
    timeout: float
    num_workers: int  # a property; its setter calls the nworkers_changed hook

    def wakeup(self) -> None: ...

    def spawn_worker(self) -> int | None: ...

    def kill_workers(self, sig: int) -> None: ...

    def reap_workers(self) -> None: ...

    def setup(self, app: Any) -> None: ...


# -- the arbiter ------------------------------------------------------------------


def wrap_arbiter(server: GunicornArbiter, **arounds: Callable[..., Any]) -> None:
    """Wrap the running arbiter's methods (names in :data:`WRAPPED`).

    ``arounds[name](original, *args)`` replaces ``server.name``. Refuses (raises
    :class:`~gunicorn_ext.versions.UnsupportedGunicorn`) a Gunicorn older than the
    tested ones, and warns about a newer one, before touching anything.
    """
    check_gunicorn(server.log)
    for name, around in arounds.items():
        if name not in WRAPPED:
            raise ValueError(f"not a wrapped arbiter method: {name}")
        original = getattr(server, name)
        setattr(server, name, _bind(around, original))


def _bind(around: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return around(original, *args, **kwargs)
    return wrapper


def workers(server: GunicornArbiter) -> list[Any]:
    """The arbiter's workers (a snapshot of ``WORKERS``, safe from any thread)."""
    return list(server.WORKERS.values())


def worker_for(server: GunicornArbiter, pid: int) -> Any:
    """The arbiter's Worker of ``pid``, or None once Gunicorn has reaped it."""
    return server.WORKERS.get(pid)


def listeners(server: GunicornArbiter) -> list[Any]:
    """The arbiter's listeners (``gunicorn.sock`` objects); empty once it stopped."""
    return list(server.LISTENERS)


def listener_socket(listener: Any) -> Any:
    """The socket of a ``gunicorn.sock`` listener (None if it has none)."""
    return getattr(listener, "sock", None)


def listener_backlog(listener: Any) -> int:
    """The ``backlog`` setting the listener was opened with."""
    return int(listener.conf.backlog)


def listener_port(listener: Any) -> int | None:
    """The configured TCP port of a listener (0: the kernel chose one; None: not TCP)."""
    addr = getattr(listener, "cfg_addr", None)
    return addr[1] if isinstance(addr, tuple) and len(addr) >= 2 else None


def peek_exit(pid: int) -> tuple[int | None, int | None] | None:
    """``(exit code, None)`` or ``(None, signal)`` of our exited child ``pid``, leaving
    it for Gunicorn to reap; None while it runs or once it was reaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status, None
    return None, info.si_status


def _reaped(pid: int) -> bool:
    """Whether our child ``pid`` has been reaped already (waited for by Gunicorn)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def reap_past_boot_errors(server: GunicornArbiter, reap: Callable[[], None],
                          keep_going: Callable[[], str | None],
                          handled: Callable[[Any], bool]) -> None:
    """Gunicorn's ``reap_workers`` (``reap``), going on past a boot error.

    ``keep_going()`` is None to let Gunicorn shut down (its ``HaltServer``), else why
    not (for the log line). ``handled(worker)`` is True for a worker whose
    ``child_exit`` already ran. For each worker Gunicorn reaped without finishing,
    this does the rest of ``reap_workers`` (pop, ``tmp.close()``, ``child_exit``),
    then lets Gunicorn reap on.
    """
    while True:
        before = dict(server.WORKERS)
        try:
            reap()
            return
        except HaltServer as exc:
            why = keep_going()
            if why is None:
                raise
            for pid, worker in before.items():
                if handled(worker):
                    continue
                if pid in server.WORKERS:
                    # Gunicorn < 27 raises before it pops the worker it reaped.
                    if not _reaped(pid):
                        continue
                    server.WORKERS.pop(pid, None)
                server.log.error("gunicorn-ext: %s (pid %s); not shutting down (%s)",
                                 exc.reason, pid, why)
                try:
                    worker.tmp.close()
                except OSError:
                    pass
                server.cfg.child_exit(server, worker)


def halt(reason: str) -> NoReturn:
    """Shut the arbiter down with status 1 (raised from a wrapped method; Gunicorn's
    main loop catches ``HaltServer`` and halts)."""
    raise HaltServer(reason, 1)


@contextlib.contextmanager
def counting_extra(server: Any, extra: int) -> Iterator[None]:
    """For one ``manage_workers`` call: ``extra`` more workers are wanted than
    ``num_workers`` says (old workers serving until their replacement is ready),
    without calling the ``nworkers_changed`` hook the public setter calls."""
    if not extra:
        yield
        return
    server._num_workers += extra
    try:
        yield
    finally:
        server._num_workers -= extra


def stop_first(server: GunicornArbiter, chosen: list[Any]) -> None:
    """Make ``manage_workers`` stop ``chosen`` (in order) before any other worker.

    Gunicorn stops the workers with the lowest ``age`` first, so they get ages
    below everyone else's.
    """
    ages = [w.age for w in server.WORKERS.values()]
    if not ages:
        return
    floor = min(ages)
    for i, w in enumerate(chosen):
        w.age = floor - 1 - i


def timed_out(worker: Any) -> bool:
    """Whether the arbiter killed ``worker`` for a missed heartbeat (``timeout``)."""
    return bool(getattr(worker, "aborted", False))


def shares_listeners(server: GunicornArbiter) -> bool:
    """After USR2 another master holds the same listening sockets."""
    return bool(getattr(server, "reexec_pid", 0) or getattr(server, "master_pid", 0))


def old_master_pid(server: GunicornArbiter) -> int:
    """The pid of the master that re-executed this one (USR2), or 0."""
    return int(getattr(server, "master_pid", 0) or 0)


def forward_hup_to_dirty_arbiter(server: Any) -> None:
    """Gunicorn's ``handle_hup`` forwards HUP to its dirty arbiter; so does ours."""
    if getattr(server, "dirty_arbiter_pid", 0):
        import signal

        server.kill_dirty_arbiter(signal.SIGHUP)


# -- a rolling HUP: Arbiter.reload() up to the spawning -------------------------------


def reset_environment(cfg: Any) -> None:
    """As ``reload()`` does first: the environment from before ``raw_env``."""
    for k in cfg.env:
        if k in cfg.env_orig:
            os.environ[k] = cfg.env_orig[k]
        else:
            os.environ.pop(k, None)


def reread_config(server: GunicornArbiter) -> str | None:
    """Run the config again (``app.reload()``); None, or why it could not be read.
    The new config is ``server.app.cfg``; :func:`apply_config` puts it in use."""
    try:
        server.app.reload()
    except SystemExit:  # Gunicorn exits on a config it can't read (it printed why)
        return "the config could not be read (see the error above)"
    except Exception as exc:
        return f"the config could not be read: {exc}"
    return None


def new_config(server: GunicornArbiter) -> Any:
    return server.app.cfg


def keep_config(server: GunicornArbiter, cfg: Any) -> None:
    """A refused re-read: the config in use stays ``cfg``."""
    server.app.cfg = cfg


def apply_config(server: GunicornArbiter) -> None:
    """Gunicorn's ``setup()`` (logger, num_workers, timeout, env, proc_name) with the
    re-read config, and its log files reopened."""
    server.setup(server.app)
    server.log.reopen_files()


def run_on_reload(server: GunicornArbiter) -> None:
    server.cfg.on_reload(server)


def renew_pidfile(server: GunicornArbiter) -> None:
    """As ``reload()``: unlink the pidfile, write the (maybe moved) new one."""
    if server.pidfile is not None:
        server.pidfile.unlink()
    if server.cfg.pidfile is not None:
        from gunicorn.pidfile import Pidfile

        server.pidfile = Pidfile(server.cfg.pidfile)
        server.pidfile.create(server.pid)


# -- the worker ---------------------------------------------------------------------


def attach(worker: Any, record: object) -> None:
    """Give a new Worker (``pre_fork``) its one reference to gunicorn-ext's record."""
    setattr(worker, ATTRIBUTE, record)


def attached(worker: Any) -> Any:
    """The record :func:`attach` gave ``worker``, or None."""
    return getattr(worker, ATTRIBUTE, None)


def on_exit_signal(worker: Any, first: Callable[[], None]) -> None:
    """In the worker, after ``post_fork``: call ``first()`` when SIGTERM (a graceful
    stop) arrives, then Gunicorn's handler. Gunicorn binds ``worker.handle_exit`` as
    the SIGTERM handler in ``init_signals`` (after ``post_fork``), and no hook runs
    on the signal, so the bound method is wrapped."""
    handle_exit = worker.handle_exit

    def on_signal(sig: Any, frame: Any) -> None:
        first()
        handle_exit(sig, frame)

    worker.handle_exit = on_signal


def app_of(worker: Any, attr: str = "wsgi") -> Any:
    """The app a worker serves: ``worker.wsgi`` (stored by ``load_wsgi()`` just before
    ``post_worker_init``; every WSGI worker reads it after) or ``worker.asgi``."""
    return getattr(worker, attr, None)


def set_app(worker: Any, app: Any, attr: str = "wsgi") -> None:
    """Serve ``app`` instead (from ``post_worker_init``): see :func:`app_of`."""
    setattr(worker, attr, app)


def sockets_of(worker: Any) -> list[Any]:
    """The sockets the worker's accept loop will use (``Worker.sockets``)."""
    return list(worker.sockets)


def event_loop_of(worker: Any) -> Any:
    """The asyncio loop ``-k asgi`` makes before ``post_worker_init`` (None for others;
    the uvicorn worker makes its own later)."""
    return getattr(worker, "loop", None)


def asgi_lifespan(worker: Any) -> str:
    """An ASGI worker's lifespan mode: "auto", "on" or "off" (``-k asgi``: its
    ``asgi_lifespan`` setting; the uvicorn worker: its uvicorn ``Config.lifespan``)."""
    config = getattr(worker, "config", None)  # uvicorn_worker.UvicornWorker's
    mode = getattr(config, "lifespan", None) if config is not None else None
    if mode is None:
        mode = getattr(worker.cfg, "asgi_lifespan", None)
    return mode if mode in ("auto", "on", "off") else "auto"


def wsgi_responded(start_response: Any) -> bool:
    """Whether the app called ``start_response`` (the one a Gunicorn WSGI worker passed
    it): part of a response may be out. Anything else counts as responded."""
    resp = getattr(start_response, "__self__", None)
    return resp is None or getattr(resp, "status", True) is not None


def count_busy(worker: Any, submitted: Callable[[], None],
               settled: Callable[[], None]) -> None:
    """Call ``submitted()`` each time a gthread worker hands a connection to its thread
    pool, and ``settled()`` each time its main thread settles one the pool finished
    (kept it alive, parked, closed or re-queued it): the difference is the connections
    that hold or wait for a thread. Both run on the worker's main thread only, so the
    counts need no lock. Wraps ``ThreadWorker.enqueue_req`` (which ``accept``,
    ``on_client_socket_readable`` and ``finish_request`` look up on the instance) and
    ``ThreadWorker.finish_request`` (which ``enqueue_req`` looks up on the instance)
    there: no hook runs at either, and no public API says how busy a gthread worker is."""
    enqueue_req = worker.enqueue_req
    finish_request = worker.finish_request

    def enqueue(conn: Any) -> None:
        submitted()
        enqueue_req(conn)

    def settle(conn: Any, fs: Any) -> None:
        try:
            finish_request(conn, fs)
        finally:
            settled()

    worker.enqueue_req = enqueue
    worker.finish_request = settle


def close_in_request_thread(worker: Any) -> None:
    """Close a gthread worker's finished connections in the thread that served them,
    not on the worker's main thread.

    Gunicorn closes a connection it will not keep alive in ``finish_request``, on the
    main thread that also accepts; 27 closes it gracefully (``TConn.close(graceful=True)``:
    shut the write side, read until the client closes, up to 2 s), so the main thread
    waits for each client's FIN, and under load every system call there is also a wait
    for the GIL behind the request threads, while connections sent to this worker wait
    to be accepted. Wraps ``ThreadWorker.handle`` on the instance (``enqueue_req``
    submits it by name for each connection): when it returns False (close), the
    thread calls ``TConn.close`` itself, Gunicorn's own close and graceful as in the
    version running, and the connection's ``close`` becomes a no-op for
    ``finish_request``, which still does its counting.
    """
    handle = worker.handle

    def run(conn: Any) -> Any:
        result = handle(conn)
        if result is False:
            close = conn.close
            try:
                if _graceful_close(type(conn)):
                    close(graceful=True)
                else:
                    close()
            except OSError:
                pass  # Gunicorn's close ignores these too; the socket is closed below
            finally:
                with contextlib.suppress(OSError):
                    conn.sock.close()
                conn.close = _closed
        return result

    worker.handle = run


def _closed(graceful: bool = False) -> None:
    """``TConn.close`` of a connection already closed by its thread."""


_GRACEFUL: dict[Any, bool] = {}


def _graceful_close(tconn: Any) -> bool:
    """Whether ``TConn.close`` takes ``graceful`` (Gunicorn 27; 25 closes at once)."""
    if tconn not in _GRACEFUL:
        import inspect

        try:
            _GRACEFUL[tconn] = "graceful" in inspect.signature(tconn.close).parameters
        except (TypeError, ValueError):
            _GRACEFUL[tconn] = False
    return _GRACEFUL[tconn]


def gthread_connections(worker: Any) -> int:
    """Connections a gthread worker holds (``ThreadWorker.nr_conns``), kept-alive ones too."""
    return int(worker.nr_conns)


def close_one(worker: Any, eligible: Callable[[Any], bool], closed: Callable[[], None]) -> None:
    """Answer the next HTTP/1 request of a gthread worker that ``eligible(req)`` accepts
    with ``Connection: close`` (``Request.force_close()``, as Gunicorn's own workers
    call it, before the response is made; Gunicorn then closes the connection after
    the whole response), call ``closed()`` in that request's thread, and stop looking.
    Wraps ``ThreadWorker.handle_request`` on the instance (``handle`` looks it up there
    for each request; HTTP/2 streams go through ``handle_http2_request``, untouched)
    only until then, so requests cost nothing while no close is wanted; no hook runs
    before the response exists (``pre_request`` is the user's). :func:`cancel_close`
    stops looking."""
    if "handle_request" in vars(worker):
        return  # already looking
    handle_request = worker.handle_request
    taken = threading.Lock()

    def handle(req: Any, conn: Any) -> Any:
        if eligible(req) and taken.acquire(blocking=False):
            # Another thread of this worker may be here too: one close is enough.
            if vars(worker).get("handle_request") is handle:
                del worker.handle_request
            req.force_close()
            closed()
        return handle_request(req, conn)

    worker.handle_request = handle


def cancel_close(worker: Any) -> None:
    """Stop :func:`close_one`'s looking (no close is wanted any more)."""
    vars(worker).pop("handle_request", None)


def may_close_after(req: Any) -> bool:
    """Whether a request's connection would stay open after its response and may be
    closed instead: a request after the first on its connection (``Request.req_number``)
    that neither asks for the close itself (``Request.should_close()``) nor asks to
    upgrade the connection (an ``Upgrade`` header, or ``upgrade`` in ``Connection``)."""
    if getattr(req, "req_number", 1) <= 1 or req.should_close():
        return False
    for name, value in req.headers:
        if name == "UPGRADE" or (name == "CONNECTION" and "upgrade" in value.lower()):
            return False
    return True


def set_sockets(worker: Any, sockets: list[Any]) -> None:
    """The sockets the worker's accept loop uses (``post_fork``, before ``init_process``)."""
    worker.sockets = sockets


__all__ = [
    "APP_LOAD_ERROR", "ATTRIBUTE", "asgi_lifespan", "cancel_close", "close_in_request_thread", "close_one",
    "count_busy", "gthread_connections", "may_close_after", "BOOT_ERRORS", "GunicornArbiter", "GunicornWorker",
    "WORKER_BOOT_ERROR", "WRAPPED", "app_of", "apply_config", "attach", "attached",
    "counting_extra", "event_loop_of", "forward_hup_to_dirty_arbiter", "halt", "keep_config", "listener_backlog", "listener_port",
    "listener_socket", "listeners",
    "new_config", "old_master_pid", "on_exit_signal", "peek_exit", "reap_past_boot_errors", "renew_pidfile",
    "reread_config", "reset_environment", "run_on_reload", "set_app", "set_sockets",
    "shares_listeners", "sockets_of", "stop_first", "timed_out", "wrap_arbiter", "worker_for", "workers",
]
