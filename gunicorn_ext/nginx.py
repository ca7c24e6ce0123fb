"""nginx in front of Gunicorn: render a config, check it with ``nginx -t`` and gixy-ng.

:func:`render` builds one http-context config (a file for ``/etc/nginx/conf.d``) from
the same blocks as the templates in the repository's ``nginx/`` directory
(:func:`templates` renders those with example values; a test keeps them in sync):

* ``upstream gunicorn_pool``: every backend and ``keepalive``; no passive ejection
  by default (``max_fails=0``): a failed attempt is retried on another backend, the
  backend stays in rotation (see :class:`Failover` for why, and for every timeout);
* one named upstream ``gx_<route>`` per backend, its other backends as ``backup``
  servers: a client pinned to a backend that is down falls back to the others;
* ``map $cookie_gx_route $gx_backend``: the sticky whitelist. A backend that answers
  sets the cookie ``gx_route=<route>`` naming itself; nginx maps a *known* route to
  its named upstream and anything else (no cookie, unknown or forged value) to
  ``gunicorn_pool``. nginx never proxies to an address taken from the request;
* the server block(s): plain HTTP, or HTTPS plus an HTTP->HTTPS redirect, and a
  default server answering unknown ``Host`` headers with 444 (connection closed).

The route of a backend defaults to its ``HOST:PORT`` lower-cased with every character
outside ``[a-z0-9_]`` replaced by ``_`` (``127.0.0.1:8000`` -> ``127_0_0_1_8000``, see
:func:`route_name`); the backend must set the cookie ``gx_route`` to that same name
(or pass ``route_names`` to use other names).

:func:`check` runs ``nginx -t`` on a file wrapped in a throw-away ``nginx.conf``
(works as non-root, never touches ``/etc/nginx``) and gixy-ng when it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from string import Template

__all__ = [
    "DEFAULT_SERVER",
    "Failover",
    "check",
    "find_nginx",
    "render",
    "route_name",
    "templates",
    "validate_backend",
    "wrapper_conf",
]

COOKIE = "gx_route"
POOL = "gunicorn_pool"
#: Idle keepalive connections per nginx worker and upstream.
KEEPALIVE = 32


@dataclass(frozen=True)
class Failover:
    """How nginx notices a backend is gone and moves a request to another (durations in
    seconds). The defaults, and why (README "Failover: per fault, not per instance"):

    A backend can go three ways. Its process dies: the kernel answers (refused, reset),
    nginx moves on in a round trip, whatever the timeouts. Its host vanishes (power, a cut
    link, a partition): nothing answers at all, no RST, no FIN, and only a timeout tells.
    Or it is merely slow: a timeout fires too, and it must not look like a dead host.
    """

    #: ``proxy_connect_timeout``. A TCP connect on a LAN takes well under a millisecond;
    #: 1 s of silence is a host that is gone (or a SYN dropped by a full backlog, an
    #: overloaded backend: moving on is right then too). Each request routed to a
    #: vanished host pays this once before its retry.
    connect_timeout: float = 1.0
    #: ``proxy_read_timeout`` / ``proxy_send_timeout`` of plain HTTP (``location /``): the
    #: longest silence between two reads of a response. 30 s is Gunicorn's own worker
    #: ``timeout``: a request longer than that belongs in a background job. Raise it above
    #: your slowest endpoint (and above ``request_timeout``, to pass the app's 503 rather
    #: than nginx's 504). It bounds how long a request in flight on a vanished host waits
    #: before its 504.
    read_timeout: float = 30.0
    #: The same two for ``/socket.io/`` and ``/ws`` (WebSocket, long-polling). Must stay
    #: well above the server's ping interval: Socket.IO's long-polling holds a request up
    #: to ``ping_interval`` (25 s) and an idle WebSocket only carries a ping every 25 s
    #: (Socket.IO's and the example's ``/ws``). 60 s tolerates one late ping, and a
    #: WebSocket whose upstream host vanished is closed by nginx after 60 s of silence
    #: (the client then reconnects elsewhere). An app with silent WebSockets must ping
    #: more often than this, or raise it.
    stream_timeout: float = 60.0
    #: ``proxy_next_upstream_tries``: attempts per request, the first included. Bounds
    #: how many workers a request that kills its worker can take down. With per-worker
    #: ports, a vanished host takes all its ports at once: give at least (ports per host
    #: + 1) so a retry always reaches another host.
    next_upstream_tries: int = 3
    #: ``proxy_next_upstream_timeout``: no retry starts later than this after the first
    #: attempt. Above ``(next_upstream_tries - 1) * connect_timeout`` so every connect
    #: timeout is retried, and below ``read_timeout`` so a *read* timeout is never
    #: retried: a request that got no answer in ``read_timeout`` may still be running on a
    #: live backend, and replaying it would multiply the load of a slow endpoint.
    next_upstream_timeout: float = 10.0
    #: ``max_fails`` of every upstream server. 0: nginx never takes a backend out.
    #: nginx counts failed attempts per ``HOST:PORT``, and a Gunicorn instance is one
    #: ``HOST:PORT`` for all its workers: a SIGKILLed worker resets its requests in
    #: flight, and those failures take the whole instance (its healthy workers too) out
    #: for ``fail_timeout``. The counter only resets after a quiet ``fail_timeout``, so
    #: any finite threshold trips under repeated worker deaths; with two instances both
    #: go and nginx answers 502 "no live upstreams" (bench/chaos.py). The price of 0: while
    #: a host is gone, a request routed to it pays ``connect_timeout`` before its retry
    #: (a pinned client once: the backend that answers re-pins it).
    max_fails: int = 0
    #: ``fail_timeout``: with ``max_fails`` > 0, how long a backend stays out.
    fail_timeout: float = 10.0
    #: ``keepalive_timeout`` of the upstreams: an idle upstream connection is closed
    #: after this. Below Gunicorn's ``keepalive`` (2 s), so nginx never reuses a
    #: connection the backend is closing (a POST lost on it would be a 502), and an idle
    #: connection to a host that vanished is not kept to be found dead later.
    idle_timeout: float = 1.0
    #: ``proxy_socket_keepalive``: TCP keepalive on upstream connections, so a WebSocket
    #: to a vanished host that the client keeps open and silent is found dead by the
    #: kernel. Its timing is the system's (``net.ipv4.tcp_keepalive_time``, 2 h by
    #: default): lower it (e.g. 60 s, ``_intvl`` 10, ``_probes`` 6) for it to matter.
    socket_keepalive: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "socket_keepalive":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}: expected True or False, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name}: expected a number, got {value!r}")
            if f.name in ("next_upstream_tries", "max_fails"):
                if not isinstance(value, int) or value < 0 or value > 1000:
                    raise ValueError(f"{f.name}: expected an integer 0-1000, got {value!r}")
            elif f.name == "next_upstream_timeout":
                _duration(f.name, value, zero_ok=True)
            else:
                _duration(f.name, value)
        if 0 < self.next_upstream_timeout <= self.connect_timeout:
            raise ValueError(f"next_upstream_timeout ({self.next_upstream_timeout}s) must be "
                             f"longer than connect_timeout ({self.connect_timeout}s), else "
                             "no connect timeout is ever retried (0: no limit)")


def _duration(what: str, value: float, zero_ok: bool = False) -> str:
    """*value* seconds as an nginx time (``30s``, ``1500ms``); refuse what nginx can't take."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{what}: expected a number of seconds, got {value!r}")
    if value == 0 and zero_ok:
        return "0"
    ms = round(value * 1000)
    if ms < 1 or value > 86400 * 7:
        raise ValueError(f"{what}: {value!r} s out of range (1 ms to 7 days"
                         f"{'; 0: no limit' if zero_ok else ''})")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class _T(Template):
    # nginx variables use "$": placeholders here are @@name / @@{name}.
    delimiter = "@@"


HEADER = """\
# gunicorn-ext: nginx in front of one or many Gunicorn instances (http context:
# copy into /etc/nginx/conf.d/). Valid on nginx >= 1.22 (Debian 12 ships 1.22.1).
# Generated by `gunicorn-ext nginx render`; check with `gunicorn-ext nginx check FILE`.
#
# Sticky routing on stock nginx (WebSocket/Socket.IO long-polling need a client to
# stay on the backend that holds its session):
#   * every backend that answers sets the cookie  gx_route=<its route name>
#     (gunicorn_ext.sticky does it; the route of HOST:PORT defaults to HOST:PORT
#     lower-cased with everything outside [a-z0-9_] turned into "_", for example
#     127.0.0.1:8000 -> 127_0_0_1_8000);
#   * `map $cookie_gx_route $gx_backend` below is a WHITELIST from route names to the
#     named upstreams gx_<route>: a missing, unknown or forged cookie maps to the
#     pool, and nginx never proxies to an address taken from the request;
#   * each gx_<route> upstream lists the other backends as `backup`: when the pinned
#     backend is down the request goes to another one, which sets its own cookie:
#     the client re-pins.
# nginx >= 1.29.6 has `sticky cookie` / `sticky learn` in open-source nginx: with it,
# drop the map and the gx_* upstreams and put in `upstream gunicorn_pool`, e.g.
#     sticky learn create=$upstream_cookie_gx_route lookup=$cookie_gx_route
#                  zone=gx_sticky:1m;
# (or `sticky cookie gx_route expires=1h httponly secure;` to let nginx set the cookie).
"""

UPSTREAM_POOL = _T("""\
# Every backend. max_fails=0 (the default): a failed attempt never takes a backend out of
# rotation. A Gunicorn instance is one server here for all its workers, and one killed
# worker resets its in-flight requests: counted as failures (max_fails=N), they would take
# the healthy workers out too, and repeated worker deaths keep the counter from ever
# resetting. The failed attempt is retried on the next server instead (below); an
# instance with no live worker refuses connections at once, a host that vanished costs
# proxy_connect_timeout. keepalive: idle connections kept open per worker (needs
# proxy_http_version 1.1 and an empty Connection header); keepalive_timeout closes them
# before Gunicorn's own keepalive (2 s) does, so nginx never sends a request on a
# connection the backend is closing, and keeps none to a vanished host for long.
upstream @@{pool} {
@@{servers}
    keepalive @@{keepalive};
    keepalive_timeout @@{idle_timeout};
}
""")

UPSTREAM_NAMED = _T("""\
upstream gx_@@{route} {
@@{servers}
    keepalive @@{keepalive};
    keepalive_timeout @@{idle_timeout};
}
""")

MAPS = _T("""\
# WebSocket: pass the client's Upgrade on, else let keepalive reuse the connection.
map $http_upgrade $connection_upgrade {
    default upgrade;
    ""      "";
}

# Sticky whitelist: route cookie -> named upstream (never an address from the request).
map $cookie_@@{cookie} $gx_backend {
    default @@{pool};
@@{entries}
}

# Ready to switch on: a response cache for cacheable GETs (nginx honours the backend's
# Cache-Control/Expires; Set-Cookie responses are not cached) and request rate limiting.
# Uncomment these and the matching proxy_cache*/limit_req lines in `location /`.
#proxy_cache_path /var/cache/nginx/gunicorn-ext levels=1:2 keys_zone=gx_cache:10m
#                 max_size=1g inactive=10m use_temp_path=off;
#limit_req_zone $binary_remote_addr zone=gx_req:10m rate=20r/s;
#limit_req_status 429;
""")

_PROXY_HEADERS = """\
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        proxy_set_header X-Real-IP $remote_addr;"""

_STREAM_LOCATION = """\
    location @@{path} {
        proxy_pass http://$gx_backend;
        proxy_http_version 1.1;
@@{proxy_headers}
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        # No buffering: frames and long-poll answers go out as they come.
        proxy_buffering off;
        proxy_request_buffering off;
        # Long-lived: a long-poll is held up to Socket.IO's ping_interval (25 s) and an
        # idle WebSocket carries a ping every 25 s (Socket.IO, the example's /ws), so this
        # must stay well above 25 s; @@{stream_timeout} of silence is a backend that is gone
        # (nginx closes, the client reconnects elsewhere). Ping more often than this.
        proxy_read_timeout @@{stream_timeout};
        proxy_send_timeout @@{stream_timeout};
    }
"""

SERVER_BODY = _T("""\
    server_name @@{server_name};
    server_tokens off;
    client_max_body_size 10m;

    # Security headers (server level: a location with its own add_header would drop them).
    add_header X-Content-Type-Options "nosniff" always;
    add_header X-Frame-Options "SAMEORIGIN" always;
    add_header Referrer-Policy "strict-origin-when-cross-origin" always;
@@{extra_headers}\
    # A conservative Content-Security-Policy, to adapt to the app before turning it on:
    #add_header Content-Security-Policy "default-src 'self'; object-src 'none'; frame-ancestors 'self'; base-uri 'self'" always;

    # Failover. A backend whose process is gone refuses or resets at once; a host that
    # vanished (power, a cut link: no RST, no FIN) is only seen by a timeout. A LAN
    # connect takes well under 1 ms, so @@{connect_timeout} of silence is a host that is
    # gone: the request moves on, paying this once (max_fails=@@{max_fails}, see the upstreams).
    proxy_connect_timeout @@{connect_timeout};
    # Plain HTTP: the longest silence between two reads of a response (Gunicorn's worker
    # timeout is 30 s; raise this above your slowest endpoint and the app's request_timeout).
    # A request in flight on a host that vanished gets its 504 after this, not retried
    # while proxy_next_upstream_timeout is shorter (the default: a read timeout may be a
    # slow live request, and replaying it would multiply its load).
    proxy_read_timeout @@{read_timeout};
    proxy_send_timeout @@{read_timeout};
@@{socket_keepalive}\
    # Retry on another server only when the attempt failed (connection refused or reset,
    # e.g. a killed worker, or a timeout). A status from the app is its answer, passed
    # on and never retried: a 503 (a store down, with Retry-After) would be the same on
    # every instance. nginx >= 1.9.13 never retries a non-idempotent request (POST, LOCK,
    # PATCH) once it was sent to a backend: `non_idempotent` is deliberately NOT in this
    # list -- keep it off. At most @@{tries} attempts (a request that kills its worker takes at
    # most that many); none started later than @@{next_timeout} after the first (by default
    # longer than the connect timeouts of the retries, shorter than a read timeout).
    proxy_next_upstream error timeout;
    proxy_next_upstream_tries @@{tries};
    proxy_next_upstream_timeout @@{next_timeout};

    location / {
        proxy_pass http://$gx_backend;
        proxy_http_version 1.1;
@@{proxy_headers}
        proxy_set_header Connection "";
        # Buffering on: nginx absorbs slow clients, the Gunicorn worker is freed at once.
        proxy_buffering on;
        proxy_request_buffering on;
        # Response cache (see proxy_cache_path above):
        #proxy_cache gx_cache;
        #proxy_cache_methods GET HEAD;
        #proxy_cache_key $scheme$host$request_uri;
        #proxy_cache_lock on;
        #proxy_cache_use_stale error timeout updating http_502 http_503;
        # Rate limiting (see limit_req_zone above):
        #limit_req zone=gx_req burst=40 nodelay;
    }

    # Socket.IO (long-polling and WebSocket) and plain WebSocket endpoints.
""" + _STREAM_LOCATION.replace("@@{path}", "/socket.io/") + "\n"
    + _STREAM_LOCATION.replace("@@{path}", "/ws") + """\
}
""")

SERVER_HTTP = _T("""\
server {
    listen @@{listen};
""")

SERVER_TLS = _T("""\
# HTTP -> HTTPS.
server {
    listen @@{http_port};
    server_name @@{server_name};
    server_tokens off;
    return 301 https://$host@@{https_port_suffix}$request_uri;
}

# HTTPS (HTTP/2: add `http2` to `listen` on nginx < 1.25.1, `http2 on;` from 1.25.1).
server {
    listen @@{listen} ssl;
    ssl_certificate @@{tls_cert};
    ssl_certificate_key @@{tls_key};
    ssl_protocols TLSv1.2 TLSv1.3;
    # Mozilla "intermediate" TLS 1.2 suites (TLS 1.3 suites are always on).
    ssl_ciphers @@{ciphers};
    ssl_prefer_server_ciphers off;
    ssl_session_timeout 1d;
    ssl_session_cache shared:gx_tls:10m;
    ssl_session_tickets off;
""")

CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
           "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
           "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")

_HSTS = ('    # HSTS: one year; add includeSubDomains/preload only when every subdomain is HTTPS.\n'
         '    add_header Strict-Transport-Security "max-age=31536000" always;\n')

DEFAULT_SERVER = _T("""\
# Default server: a request whose Host matches no server_name gets no answer at all
# (444 closes the connection), so the app is not reachable under arbitrary names.
@@{servers}""")

_DEFAULT_PLAIN = _T("""\
server {
    listen @@{port} default_server;
    server_name _;
    server_tokens off;
    return 444;
}
""")

_DEFAULT_TLS = _T("""\
server {
    listen @@{port} ssl default_server;
    server_name _;
    server_tokens off;
    ssl_reject_handshake on;  # nginx >= 1.19.4: no certificate needed here
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers @@{ciphers};
    return 444;
}
""")

# ---------------------------------------------------------------- validation

_FORBIDDEN = re.compile(r"[;{}\n\r\"'\\$#`\s\x00]")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_IPV6 = re.compile(r"^\[[0-9A-Fa-f:.]+\]$")
_SERVER_NAME = re.compile(r"^(?=.{1,253}$)(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
                          r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*$")
_ROUTE = re.compile(r"^[a-z0-9_]{1,64}$")
_PATH = re.compile(r"^/[A-Za-z0-9._/+-]+$")


def _no_syntax(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: must be a non-empty string")
    bad = _FORBIDDEN.search(value)
    if bad:
        raise ValueError(f"{what} {value!r}: must not contain {bad.group()!r} "
                         "(no whitespace, newlines, quotes, ';', '{', '}', '$', '#', '\\')")


def _port(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: must be an integer port, got {value!r}")
    if not 1 <= value <= 65535:
        raise ValueError(f"{what}: port {value} out of range 1-65535")
    return value


def validate_backend(backend: str) -> tuple[str, int]:
    """Check ``HOST:PORT`` (IPv4, host name or ``[IPv6]``); return ``(host, port)``."""
    _no_syntax("backend", backend)
    host, sep, port_text = backend.rpartition(":")
    if not sep or not host or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"backend {backend!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    if not (_HOSTNAME.match(host) or _IPV6.match(host)):
        raise ValueError(f"backend {backend!r}: invalid host {host!r}")
    return host, _port(f"backend {backend!r}", int(port_text))


def route_name(backend: str) -> str:
    """The default route of ``HOST:PORT``, the name :class:`~gunicorn_ext.sticky.RouteCookie`
    puts in the cookie (one function for both sides, so they always match)."""
    from .sticky import route_name as sticky_route_name

    return sticky_route_name(backend)


def _validate_server_name(server_name: str) -> str:
    _no_syntax("server_name", server_name)
    if not _SERVER_NAME.match(server_name):
        raise ValueError(f"server_name {server_name!r}: expected a host name such as "
                         "example.com or *.example.com (letters, digits, '-', '_', '.')")
    return server_name


def _validate_path(what: str, path: str) -> str:
    _no_syntax(what, path)
    if not _PATH.match(path) or "/../" in path + "/":
        raise ValueError(f"{what} {path!r}: expected an absolute path of [A-Za-z0-9._/+-]")
    return path


# ------------------------------------------------------------------ rendering


def _servers(lines: list[str]) -> str:
    return "\n".join(f"    server {line};" for line in lines)


def _upstreams(backends: list[str], routes: list[str], failover: Failover) -> str:
    # Explicit on every line: nginx's default is max_fails=1.
    health = f"max_fails={failover.max_fails}"
    if failover.max_fails:
        health += f" fail_timeout={_duration('fail_timeout', failover.fail_timeout)}"
    idle = _duration("idle_timeout", failover.idle_timeout)
    out = [UPSTREAM_POOL.substitute(
        pool=POOL, keepalive=KEEPALIVE, idle_timeout=idle,
        servers=_servers([f"{b} {health}" for b in backends]))]
    out.append("# One upstream per route: the pinned backend, the others as fallback (backup;\n"
               "# max_fails explicit on each, since nginx's default max_fails=1 would eject on "
               "one reset).")
    for backend, route in zip(backends, routes, strict=True):
        lines = [f"{backend} {health}"] + [f"{b} backup {health}" for b in backends if b != backend]
        out.append(UPSTREAM_NAMED.substitute(route=route, servers=_servers(lines),
                                             keepalive=KEEPALIVE, idle_timeout=idle))
    return "\n".join(out)


def _maps(routes: list[str], cookie: str) -> str:
    entries = "\n".join(f'    "{r}" gx_{r};' for r in routes)
    return MAPS.substitute(cookie=cookie, pool=POOL, entries=entries)


_SOCKET_KEEPALIVE = """\
    # TCP keepalive on upstream connections: a silent WebSocket to a vanished host is found
    # dead by the kernel, on the system's timing (net.ipv4.tcp_keepalive_time: 2 h unless
    # lowered, e.g. to 60 s with tcp_keepalive_intvl 10 and tcp_keepalive_probes 6).
    proxy_socket_keepalive on;
"""


def _server_body(server_name: str, tls: bool, failover: Failover) -> str:
    return SERVER_BODY.substitute(
        server_name=server_name, proxy_headers=_PROXY_HEADERS,
        extra_headers=_HSTS if tls else "",
        connect_timeout=_duration("connect_timeout", failover.connect_timeout),
        read_timeout=_duration("read_timeout", failover.read_timeout),
        stream_timeout=_duration("stream_timeout", failover.stream_timeout),
        socket_keepalive=_SOCKET_KEEPALIVE if failover.socket_keepalive else "",
        max_fails=failover.max_fails, tries=failover.next_upstream_tries,
        next_timeout=_duration("next_upstream_timeout", failover.next_upstream_timeout,
                               zero_ok=True))


def _default_server(ports: list[tuple[int, bool]]) -> str:
    blocks = [(_DEFAULT_TLS if tls else _DEFAULT_PLAIN).substitute(port=port, ciphers=CIPHERS)
              for port, tls in ports]
    return DEFAULT_SERVER.substitute(servers="\n".join(blocks))


def render(backends: list[str], listen: int, server_name: str,
           route_names: list[str] | None = None, tls_cert: str | None = None,
           tls_key: str | None = None, *, http_port: int = 80,
           default_server: bool = True, cookie: str = COOKIE,
           failover: Failover | None = None) -> str:
    """Return one http-context nginx config proxying *server_name* to *backends*.

    *backends* are ``HOST:PORT``; *route_names* (same length, ``[a-z0-9_]``, unique)
    default to :func:`route_name` of each backend. With *tls_cert* and *tls_key*,
    *listen* is the HTTPS port and *http_port* (default 80) redirects to it.
    With *default_server* a catch-all server answers unknown hosts with 444.
    *cookie* is the route cookie's name (the ``sticky_cookie`` setting of the backends).
    *failover* sets the timeouts, retries and ejection (default :class:`Failover()`).
    Raises :class:`ValueError` on any invalid or unsafe input.
    """
    if not backends:
        raise ValueError("at least one backend is needed")
    if isinstance(backends, str):
        raise ValueError("backends: expected a list of HOST:PORT strings")
    for b in backends:
        validate_backend(b)
    if len(set(backends)) != len(backends):
        raise ValueError("backends: duplicates")
    listen = _port("listen", listen)
    server_name = _validate_server_name(server_name)
    if route_names is None:
        routes = [route_name(b) for b in backends]
    else:
        routes = list(route_names)
        if len(routes) != len(backends):
            raise ValueError(f"{len(routes)} route names for {len(backends)} backends: "
                             "give one --route per --backend, in the same order")
        for r in routes:
            _no_syntax("route", r)
            if not _ROUTE.match(r):
                raise ValueError(f"route {r!r}: expected 1-64 characters of [a-z0-9_]")
    if len(set(routes)) != len(routes):
        raise ValueError(f"route names must be unique: {routes}")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    tls = tls_cert is not None and tls_key is not None

    from .sticky import COOKIE_NAME_RE

    if not isinstance(cookie, str) or not COOKIE_NAME_RE.match(cookie):
        raise ValueError(f"cookie {cookie!r}: expected 1-64 characters of [A-Za-z0-9_]")
    if failover is None:
        failover = Failover()
    elif not isinstance(failover, Failover):
        raise ValueError(f"failover: expected a Failover, got {failover!r}")
    parts = [HEADER.replace(COOKIE, cookie), _upstreams(backends, routes, failover),
             _maps(routes, cookie)]
    if tls:
        assert tls_cert is not None and tls_key is not None
        http_port = _port("http_port", http_port)
        if http_port == listen:
            raise ValueError("the HTTP redirect port must differ from the HTTPS port")
        parts.append(SERVER_TLS.substitute(
            http_port=http_port, listen=listen, server_name=server_name,
            https_port_suffix="" if listen == 443 else f":{listen}",
            tls_cert=_validate_path("tls_cert", tls_cert),
            tls_key=_validate_path("tls_key", tls_key), ciphers=CIPHERS)
            + _server_body(server_name, True, failover))
        ports = [(http_port, False), (listen, True)]
    else:
        parts.append(SERVER_HTTP.substitute(listen=listen)
                     + _server_body(server_name, False, failover))
        ports = [(listen, False)]
    if default_server:
        parts.append(_default_server(ports))
    return "\n".join(parts)


#: Example values of the templates in nginx/.
EXAMPLE_BACKENDS = ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"]
EXAMPLE_CERT = "/etc/ssl/certs/example.com.pem"
EXAMPLE_KEY = "/etc/ssl/private/example.com.key"


def templates() -> dict[str, str]:
    """The template files of ``nginx/`` (name -> text), rendered from the blocks above."""
    plain = render(EXAMPLE_BACKENDS, 80, "example.com", default_server=False)
    tls = render(EXAMPLE_BACKENDS, 443, "example.com", tls_cert=EXAMPLE_CERT,
                 tls_key=EXAMPLE_KEY, default_server=False)
    tls_note = ("# TLS variant of gunicorn-ext.conf: install this file INSTEAD of that one\n"
                f"# (same upstreams and maps; certificate paths are placeholders: {EXAMPLE_CERT},\n"
                f"# {EXAMPLE_KEY}). Add default-server.conf for unknown hosts.\n#\n")
    return {
        "gunicorn-ext.conf": plain,
        "tls.conf": tls_note + tls,
        "default-server.conf": _default_server([(80, False), (443, True)]),
    }


# ------------------------------------------------------------------- checking


def find_nginx() -> str | None:
    """The nginx binary: on PATH or in /usr/sbin, /usr/local/sbin, /usr/local/nginx/sbin."""
    found = shutil.which("nginx")
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"):
        path = os.path.join(d, "nginx")
        if os.access(path, os.X_OK):
            return path
    return None


def wrapper_conf(includes: list[str], tmpdir: str, *, user: str | None = None,
                 access_log: bool = False) -> str:
    """A full nginx.conf including the http-context files *includes*; state in *tmpdir*."""
    lines = [f"user {user};" if user else "", "worker_processes 1;",
             "worker_rlimit_nofile 1024;",
             f"pid {tmpdir}/nginx.pid;", f"error_log {tmpdir}/error.log warn;",
             "events { worker_connections 256; }", "http {",
             f"    access_log {tmpdir + '/access.log' if access_log else 'off'};"]
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        lines.append(f"    {name}_temp_path {tmpdir}/{name}_temp;")
    lines += [f"    include {os.path.abspath(p)};" for p in includes]
    lines.append("}")
    return "\n".join(line for line in lines if line) + "\n"


def _gixy_cmd() -> list[str] | None:
    exe = os.path.join(os.path.dirname(sys.executable), "gixy")
    if os.access(exe, os.X_OK):
        return [exe]
    if shutil.which("gixy"):
        return ["gixy"]
    if importlib.util.find_spec("gixy") is None:
        return None
    return [sys.executable, "-m", "gixy"]


_PROXY_PASS = re.compile(r"proxy_pass\s+([^;]*);")


def _gx_backend_only(item: dict[str, object]) -> bool:
    """True for gixy's ``missing_resolver`` on ``proxy_pass http://$gx_backend`` alone.

    A known false positive: gixy cannot tell that every value of the sticky map is the
    name of an ``upstream`` block (nginx then resolves nothing, so no resolver is
    needed). Any other proxy_pass in the finding keeps it reported.
    """
    if item.get("plugin") != "missing_resolver":
        return False
    targets = _PROXY_PASS.findall(str(item.get("config") or ""))
    return bool(targets) and all(t.strip() == "http://$gx_backend" for t in targets)


def _gixy(wrapper: str) -> list[str]:
    cmd = _gixy_cmd()
    if cmd is None:
        return []
    # -ll: MEDIUM and HIGH only.
    proc = subprocess.run([*cmd, "-ll", "-f", "json", wrapper], capture_output=True,
                          text=True, timeout=120)
    try:
        found = json.loads(proc.stdout or "[]")
    except ValueError:
        return [f"gixy: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}"]
    problems = []
    for item in found if isinstance(found, list) else []:
        if str(item.get("severity", "")).upper() not in ("MEDIUM", "HIGH"):
            continue
        if _gx_backend_only(item):
            continue
        problems.append(f"gixy {item.get('severity')} [{item.get('plugin')}] "
                        f"{item.get('summary')}: {item.get('reason') or ''} "
                        f"{item.get('config') or ''}".strip())
    if not problems and proc.returncode not in (0,) and not found:
        problems.append(f"gixy: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return problems


def check(path: str, *, extra: list[str] | None = None, gixy: bool = True) -> list[str]:
    """Check the http-context config *path* (plus *extra* files); return the problems.

    Runs ``nginx -t`` on a temporary wrapper nginx.conf (warnings count as problems),
    then gixy-ng (medium and high findings) when installed. Empty list: all good.
    """
    files = [path, *(extra or [])]
    for f in files:
        if not os.path.isfile(f):
            return [f"{f}: no such file"]
    nginx = find_nginx()
    if nginx is None:
        return ["nginx not found (looked on PATH and in /usr/sbin)"]
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gx-nginx-check-") as tmp:
        wrapper = os.path.join(tmp, "nginx.conf")
        with open(wrapper, "w") as fh:
            fh.write(wrapper_conf(files, tmp))
        proc = subprocess.run([nginx, "-t", "-q", "-e", "stderr", "-p", tmp + "/", "-c", wrapper],
                              capture_output=True, text=True, timeout=60)
        output = (proc.stderr + proc.stdout).strip()
        for line in output.splitlines():
            if "[emerg]" in line or "[warn]" in line or "[alert]" in line or "[crit]" in line:
                problems.append("nginx: " + re.sub(r"^\d+#\d+: ", "", line.split("] ", 1)[-1].strip()))
        if proc.returncode != 0 and not problems:
            problems.append(f"nginx -t failed (exit {proc.returncode}): {output}")
        if gixy:
            problems += _gixy(wrapper)
    return problems
