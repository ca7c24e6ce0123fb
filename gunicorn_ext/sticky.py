"""Sticky routing behind nginx: the backend that answers pins the client to itself.

How it works (stock nginx >= 1.22, no ``sticky`` directive needed):

1. Every backend wraps the WSGI app in :class:`RouteCookie`. The middleware sets a
   cookie (default ``gx_route``) whose value is the *route name* of the backend that
   produced the response, e.g. ``127_0_0_1_9000``. With ``gunicorn_ext.enable()`` the
   worker hooks do it for any app (:func:`pin_worker`; settings ``sticky`` and
   ``sticky_cookie``); an app that wraps itself keeps its own and is never pinned twice.
2. nginx maps ``$cookie_gx_route`` through a **whitelist** to a named upstream::

       map $cookie_gx_route $gx_backend {
           default           pool;      # no cookie, unknown or forged value
           h_127_0_0_1_8000  gx_h_127_0_0_1_8000;
           h_127_0_0_1_8001  gx_h_127_0_0_1_8001;
       }
       upstream gx_h_127_0_0_1_8000 { server 127.0.0.1:8000; server 127.0.0.1:8001 backup; }
       ...
       proxy_pass http://$gx_backend;

   The client never supplies an address: an unknown value (``127.0.0.1:22``, ``evil``,
   anything not in the map) falls to ``default`` and goes to the load-balanced pool.
3. If the pinned backend is down, its upstream's ``backup`` servers (or the pool) answer;
   that backend sees a cookie naming *another* route and re-pins the client to itself,
   so the client stays on the new backend afterwards (failover without ping-pong).
4. When the cookie already names this backend the middleware adds nothing, so steady
   traffic carries no ``Set-Cookie`` churn (and stays cacheable where it otherwise was).

The route name of a ``host:port`` is :func:`route_name`; the nginx renderer must build
the map keys and upstream names with the same function so both sides agree.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from types import TracebackType
from typing import Any

__all__ = [
    "COOKIE_NAME_RE", "ENVIRON_KEY", "ROUTE_RE", "AsgiRouteCookie", "RouteCookie", "default_route",
    "instance_route", "pin_worker", "read_cookie", "route_name",
]

#: What a route value may look like. Narrow on purpose: it is a map key in nginx and a
#: cookie value, so it never needs quoting or escaping on either side.
ROUTE_RE = re.compile(r"^[a-z0-9_]{1,64}$")

#: What a route cookie's name may look like: nginx reads it as the variable
#: ``$cookie_<name>``, and an nginx variable name has no other characters.
COOKIE_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")

#: The WSGI environ key naming the innermost :class:`RouteCookie` of a request: only
#: that one pins, so an app wrapped in its own under the worker hooks' gets one cookie.
ENVIRON_KEY = "gunicorn_ext.route_cookie"

_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]", "*")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_name(host_port: str) -> str:
    """Return the route name of a backend address: ``"127.0.0.1:8000"`` -> ``"127_0_0_1_8000"``.

    The address is lower-cased and every character outside ``[a-z0-9]`` becomes ``_``.
    The nginx renderer (:mod:`gunicorn_ext.nginx`) uses this same function for the
    ``map`` keys and upstream names, otherwise cookies set by the backends would never match
    the whitelist (clients would merely fall back to the pool: safe, but not sticky).

    Raises :class:`ValueError` if *host_port* is empty or the result is longer than 64
    characters.
    """
    text = host_port.strip()
    if not text:
        raise ValueError("route_name() needs a non-empty host:port")
    name = re.sub(r"[^a-z0-9]", "_", text.lower())
    if not ROUTE_RE.match(name):
        raise ValueError(f"route name for {host_port!r} is invalid or too long: {name!r}")
    return name


def default_route(environ: dict[str, str] | None = None) -> str:
    """The route of this process from the environment.

    ``GX_ROUTE`` if set (used verbatim, validated later); else :func:`route_name` of
    ``INSTANCE``; else of the first address in ``BIND`` (Gunicorn's bind, e.g.
    ``127.0.0.1:8000``). Raises :class:`ValueError` if none of them is set.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("GX_ROUTE", "").strip()
    if explicit:
        return explicit
    for var in ("INSTANCE", "BIND"):
        value = env.get(var, "").strip()
        if value:
            first = re.split(r"[\s,]+", value)[0]
            return route_name(first)
    raise ValueError("no route: pass route=..., or set GX_ROUTE, INSTANCE or BIND")


def instance_route(bind: Sequence[str], environ: dict[str, str] | None = None) -> str:
    """The route of a whole Gunicorn instance (per-worker ports off), from its *bind* list.

    ``GX_ROUTE`` if set; else :func:`route_name` of the first address Gunicorn binds,
    which is the ``--backend`` nginx is rendered with (``127.0.0.1:8000`` ->
    ``127_0_0_1_8000``). A wildcard host (``0.0.0.0:8000``, ``[::]:8000``) stands for
    this machine, so its host name is used (``web1:8000`` -> ``web1_8000``). Raises
    :class:`ValueError` when there is no address or the name is invalid or too long.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("GX_ROUTE", "").strip()
    if explicit:
        if not ROUTE_RE.match(explicit):
            raise ValueError(f"GX_ROUTE must match {ROUTE_RE.pattern}, got {explicit!r}")
        return explicit
    if not bind:
        raise ValueError("no route: Gunicorn binds no address; set GX_ROUTE")
    first = bind[0]
    host, sep, port = first.rpartition(":")
    if sep and port.isdigit() and host in _WILDCARD_HOSTS:
        first = f"{socket.gethostname()}:{port}"
    return route_name(first)


def pin_worker(worker: Any, route: str, cookie_name: str = "gx_route") -> bool:
    """Wrap the app a Gunicorn worker serves in :class:`RouteCookie` (``post_worker_init``).

    Gunicorn internals: ``Worker.init_process()`` stores the loaded app as
    ``worker.wsgi`` (``load_wsgi()``) just before it calls the ``post_worker_init`` hook,
    and every WSGI worker class reads that attribute only after it (sync and gthread per
    request, gevent and tornado when their server starts in ``run()``); replacing it is
    the one seam that covers any WSGI app without touching it. Under an ASGI worker
    (``-k asgi``: ``worker.asgi``; the uvicorn worker: ``worker.wsgi``, read in ``run()``)
    the app gets :class:`AsgiRouteCookie` instead. Returns False (with one log line)
    when the worker serves no app.
    """
    from . import gunicorn_internals as gi  # apps import sticky outside Gunicorn too
    from .asgi import app_attribute  # settings -> sticky; asgi -> reporter -> settings
    from .worker_record import slot_of

    attr = app_attribute(worker)
    if attr is not None:
        gi.set_app(worker, AsgiRouteCookie(gi.app_of(worker, attr), route=route,
                                           cookie_name=cookie_name), attr)
        worker.log.info("gunicorn-ext: worker slot %s pins its clients with the cookie %s=%s",
                        slot_of(worker, "?"), cookie_name, route)
        return True
    app = gi.app_of(worker)
    if app is None:
        worker.log.warning("gunicorn-ext: sticky routing needs a WSGI worker; %s serves no "
                           "WSGI app, so no %s cookie is set (wrap the app yourself, or set "
                           "sticky=False)", type(worker).__name__, cookie_name)
        return False
    gi.set_app(worker, RouteCookie(app, route=route, cookie_name=cookie_name))
    worker.log.info("gunicorn-ext: worker slot %s pins its clients with the cookie %s=%s",
                    slot_of(worker, "?"), cookie_name, route)
    return True


def read_cookie(header: str, name: str) -> str | None:
    """Return the value of the first cookie *name* in a ``Cookie`` header, or ``None``.

    A plain split on ``;`` (not :class:`http.cookies.SimpleCookie`, which silently drops
    the whole header on one malformed pair). The first occurrence wins, as with nginx's
    ``$cookie_<name>``, so the middleware and nginx judge the same value.
    """
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


class RouteCookie:
    """WSGI middleware that pins the client to this backend with a route cookie.

    Usage (any WSGI app; for Flask wrap ``wsgi_app`` so Flask's own app object stays)::

        app.wsgi_app = RouteCookie(app.wsgi_app)                # route from GX_ROUTE/INSTANCE/BIND
        app.wsgi_app = RouteCookie(app.wsgi_app, route="a", secure=True)

    On every response it adds ``Set-Cookie: <cookie_name>=<route>; Path=/; HttpOnly;
    SameSite=Lax`` (plus ``Secure`` and ``Max-Age`` when asked) unless the request's
    cookie already names this route. So a new client gets pinned, a client whose pinned
    backend failed over to this one gets re-pinned here, and a pinned client sees no
    ``Set-Cookie`` churn. If the app itself already set the cookie, it is left alone;
    of nested ``RouteCookie`` (the worker hooks' around an app's own), only the innermost
    pins.

    Args:
        app: the WSGI application to wrap.
        route: this backend's route name; default :func:`default_route`. Must match
            ``^[a-z0-9_]{1,64}$`` (it is an nginx map key), else :class:`ValueError`.
        cookie_name: the cookie nginx reads (``$cookie_<name>``); default ``gx_route``.
            Must match ``^[A-Za-z0-9_]{1,64}$`` (an nginx variable name).
        secure: add ``Secure``: ``True`` always, ``False`` never, ``None`` (default) when
            the request came over HTTPS (``wsgi.url_scheme``, which Gunicorn takes from
            ``X-Forwarded-Proto`` only from ``forwarded_allow_ips``, i.e. local nginx).
        max_age: ``Max-Age`` in seconds; ``None`` makes a session cookie.
    """

    def __init__(
        self,
        app: WSGIApp,
        route: str | None = None,
        cookie_name: str = "gx_route",
        secure: bool | None = None,
        max_age: int | None = None,
    ) -> None:
        value = default_route() if route is None else route
        if not isinstance(value, str) or not ROUTE_RE.match(value):
            raise ValueError(f"route must match {ROUTE_RE.pattern}, got {value!r}")
        if not isinstance(cookie_name, str) or not COOKIE_NAME_RE.match(cookie_name):
            raise ValueError(f"cookie_name must match {COOKIE_NAME_RE.pattern}, got {cookie_name!r}")
        if secure not in (True, False, None):
            raise ValueError(f"secure must be True, False or None, got {secure!r}")
        if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0):
            raise ValueError(f"max_age must be a non-negative int or None, got {max_age!r}")
        self.app = app
        self.route: str = value
        self.cookie_name = cookie_name
        self.secure = secure
        self.max_age = max_age
        self._plain = self._build_set_cookie(False)
        self._secure = self._build_set_cookie(True)
        #: The request cookie that needs no pin, as a pinned client sends it alone (or
        #: first, followed by ``;``): every request of a pinned client matches it.
        self.pinned = f"{cookie_name}={value}"
        self._pinned_first = self.pinned + ";"

    def _build_set_cookie(self, secure: bool) -> str:
        parts = [f"{self.cookie_name}={self.route}", "Path=/"]
        if self.max_age is not None:
            parts.append(f"Max-Age={self.max_age}")
        parts += ["HttpOnly", "SameSite=Lax"]
        if secure:
            parts.append("Secure")
        return "; ".join(parts)

    def _set_cookie_for(self, environ: dict[str, Any]) -> str:
        if self.secure is None:
            return self._secure if environ.get("wsgi.url_scheme") == "https" else self._plain
        return self._secure if self.secure else self._plain

    def needs_pin(self, environ: dict[str, Any]) -> bool:
        """True unless the request's route cookie already names this backend."""
        header = environ.get("HTTP_COOKIE")
        if not header:
            return True
        # Fast path (every request of a pinned client): ours is the first cookie, as
        # read_cookie would find it; anything else takes the full parse.
        if header == self.pinned or header.startswith(self._pinned_first):
            return False
        return read_cookie(header, self.cookie_name) != self.route

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Call the app; add the ``Set-Cookie`` header to its response if needed."""
        environ[ENVIRON_KEY] = self  # a RouteCookie inside the app takes over from this one
        header = environ.get("HTTP_COOKIE")
        # needs_pin(), with its fast path inlined: a pinned client sends ours first or alone.
        if header and (header == self.pinned or header.startswith(self._pinned_first)
                       or read_cookie(header, self.cookie_name) == self.route):
            return self.app(environ, start_response)
        prefix = self.cookie_name + "="

        def pinning_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            ours = environ.get(ENVIRON_KEY) is self
            already = any(
                k.lower() == "set-cookie" and v.lstrip().startswith(prefix) for k, v in headers
            )
            if ours and not already:
                headers = [*headers, ("Set-Cookie", self._set_cookie_for(environ))]
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        return self.app(environ, pinning_start_response)


class AsgiRouteCookie:
    """ASGI middleware doing what :class:`RouteCookie` does, for HTTP responses.

    Same arguments and validation as :class:`RouteCookie`, same cookie; ``secure=None``
    follows the scope's ``scheme``. The cookie header of the request is read as nginx
    reads it (several ``cookie`` headers, as HTTP/2 sends them, count as one). Of nested
    ones, only the innermost pins (it marks the scope). WebSocket and lifespan scopes
    pass through untouched.
    """

    def __init__(self, app: ASGIApp, route: str | None = None, cookie_name: str = "gx_route",
                 secure: bool | None = None, max_age: int | None = None) -> None:
        # The WSGI middleware validates and builds the header values; only they are used.
        self._wsgi = RouteCookie(_no_app, route=route, cookie_name=cookie_name, secure=secure,
                                 max_age=max_age)
        self.app = app
        self.route = self._wsgi.route
        self.cookie_name = cookie_name
        self._prefix = (cookie_name + "=").encode()
        self._plain = self._wsgi._plain.encode("latin-1")
        self._secure = self._wsgi._secure.encode("latin-1")
        self._pinned = self._wsgi.pinned.encode("latin-1")
        self._pinned_first = self._pinned + b";"
        #: The cookie header of a client pinned here whose only cookie is ours: a scope's
        #: headers list holds it on most requests (found by ``in``, without a loop). A
        #: request holding it is pinned here even if another cookie header, as HTTP/2 may
        #: send, names another route first (nginx would have routed it there).
        self.pinned_header: tuple[bytes, bytes] = (b"cookie", self._pinned)

    def _pinned_in(self, headers: list[Any] | tuple[Any, ...]) -> bool:
        """True when the request's route cookie, read from all its cookie headers as
        one, names this backend (what :meth:`prepare` asks when ours is not first)."""
        cookies = "; ".join(bytes(v).decode("latin-1") for k, v in headers
                            if k.lower() == b"cookie")
        return read_cookie(cookies, self.cookie_name) == self.route

    def prepare(self, scope: Scope, send: Send) -> Send:
        """For an HTTP *scope*: mark it as this cookie's, and return the ``send`` the app
        gets, which adds the ``Set-Cookie`` unless the client is pinned here already
        (then it is *send* itself). :class:`~gunicorn_ext.asgi.ClusterMiddleware` calls
        it instead of awaiting this layer: one coroutine less on every request."""
        scope[ENVIRON_KEY] = self  # a route cookie inside the app takes over from this one
        headers = scope.get("headers", ())
        if self.pinned_header in headers:
            return send
        if not isinstance(headers, (list, tuple)):
            headers = list(headers)
        for k, v in headers:
            # Servers send lower-case names (``-k asgi`` and uvicorn do); others are allowed.
            if k == b"cookie" or (len(k) == 6 and k.lower() == b"cookie"):
                # Every request of a pinned client: ours is the first cookie, no full read.
                if v == self._pinned or v.startswith(self._pinned_first) or self._pinned_in(headers):
                    return send
                break
        secure = self._wsgi.secure
        value = (self._secure if (scope.get("scheme") == "https" if secure is None else secure)
                 else self._plain)

        async def pinning_send(message: Any) -> None:
            if message["type"] == "http.response.start" and scope.get(ENVIRON_KEY) is self:
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"set-cookie" and bytes(v).lstrip().startswith(self._prefix)
                           for k, v in headers):
                    headers.append((b"set-cookie", value))
                    message = {**message, "headers": headers}
            await send(message)

        return pinning_send

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, self.prepare(scope, send))


def _no_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    raise RuntimeError("not a WSGI app")  # pragma: no cover
