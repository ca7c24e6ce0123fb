"""Every gunicorn-ext setting, its default, and its validation, in one place.

Settings are keyword arguments of :func:`gunicorn_ext.enable`. A bad value
stops Gunicorn at startup with a message naming the setting. Sizes accept an
int (bytes) or a string such as ``"512M"``; durations are seconds.

Gunicorn's own settings keep their meaning: ``max_requests`` and
``max_requests_jitter`` recycle by request count, ``timeout`` detects hung
workers, ``workers`` is the slot count.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields
from typing import Any

from .sticky import COOKIE_NAME_RE

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class SettingsError(ValueError):
    """A gunicorn-ext setting has an invalid value."""


def parse_size(name: str, value: Any) -> int:
    """Bytes from an int or a string like ``"512M"``; 0 means off."""
    if isinstance(value, bool):
        raise SettingsError(f"gunicorn-ext setting {name} must be a size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise SettingsError(
            f"gunicorn-ext setting {name} must be bytes or a size like '512M', got {value!r}")
    if size < 0:
        raise SettingsError(f"gunicorn-ext setting {name} must not be negative, got {value!r}")
    return size


def parse_address(name: str, value: Any) -> tuple[str, int]:
    """``(host, port)`` from ``"host:port"`` or ``"[v6]:port"``; a clear error otherwise."""
    def bad(why: str) -> SettingsError:
        return SettingsError(f"gunicorn-ext setting {name} {why}, got {value!r}")

    if not isinstance(value, str):
        raise bad("must be a string like '127.0.0.1:9191'")
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise bad("must be 'host:port', such as '127.0.0.1:9191'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise bad("must put an IPv6 address in brackets, such as '[::1]:9191'")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise bad("must end in a port number from 1 to 65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (no name is resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    # -- bus
    #: Largest bus frame accepted, in bytes. A bigger one closes the sender's
    #: connection with a logged reason.
    ipc_max_frame: int = 4 * 1024 * 1024
    #: Bytes the primary may queue for a worker that is not reading its bus
    #: before it gives up on that worker's connection.
    ipc_max_backlog: int = 64 * 1024 * 1024

    # -- restart policy (PM2's exponential backoff, plus a breaker)
    #: Delay before respawning a slot whose worker crashed twice in a row
    #: (seconds); the first crash respawns at once.
    restart_delay: float = 0.1
    #: Each further crash multiplies the delay by this.
    restart_backoff_factor: float = 1.5
    #: The delay never exceeds this.
    restart_max_delay: float = 15.0
    #: A worker that lived this long before exiting resets its slot's backoff.
    restart_stable_after: float = 30.0
    #: This many unstable exits of a slot within ``restart_breaker_window`` open
    #: the breaker: the slot (or the instance) stops respawning. 0 disables it.
    restart_breaker_failures: int = 10
    restart_breaker_window: float = 60.0
    #: Unstable exits: a boot failure, an exit before the worker reported ready,
    #: or one within this many seconds after it (PM2's min_uptime). A worker that
    #: reported ready and was then killed by a signal never counts.
    restart_min_uptime: float = 1.0
    #: An open breaker waits this long, then tries one worker (half-open): it
    #: closes once that worker has been ready ``restart_min_uptime`` seconds, and
    #: each failed try doubles the wait, up to ``restart_breaker_max_cooldown``.
    restart_breaker_cooldown: float = 30.0
    restart_breaker_max_cooldown: float = 300.0
    #: "slot": only the crashing slot stops; "instance": every slot stops.
    restart_breaker_scope: str = "slot"
    #: "hold": the primary keeps running (with what still serves, refusing
    #: connections while no worker runs) and retries after the cool-down;
    #: "exit": the primary shuts down with exit status 1.
    restart_breaker_action: str = "hold"
    #: Keep Gunicorn's behaviour of shutting down when a worker fails to boot
    #: (app import error). Off: such a failure is a crash like any other and
    #: goes through backoff and the breaker. During a rolling reload a boot
    #: failure never shuts down: the rollout stops and old workers keep serving.
    halt_on_boot_error: bool = True

    # -- recycling
    #: RSS above which a worker finishes its in-flight requests, exits and is
    #: replaced. Checked after each request and every ``memory_check_interval``.
    memory_soft_limit: int = 0
    #: RSS above which the primary stops a worker: TERM, then KILL after
    #: ``memory_hard_grace`` seconds. 0 disables.
    memory_hard_limit: int = 0
    memory_hard_grace: float = 10.0
    memory_check_interval: float = 1.0
    #: A worker older than this (plus up to ``max_lifetime_jitter``, random per
    #: worker) exits gracefully and is replaced. 0 disables.
    max_lifetime: float = 0.0
    max_lifetime_jitter: float = 0.0

    # -- request deadlines
    #: A request running longer than this (seconds) has its stack logged, gets 503
    #: when nothing was sent yet, and its worker is recycled gracefully. 0: off.
    #: WebSocket upgrades are exempt.
    request_timeout: float = 0.0

    # -- rolling reload
    #: Workers replaced at a time by ``gunicorn-ext reload --rolling``.
    reload_batch: int = 1
    #: How long a new worker may take to report ready before the rollout stops.
    reload_ready_timeout: float = 60.0

    # -- per-worker ports (for nginx to pin a client to one worker)
    #: When set, slot N also listens on port ``worker_ports_base + N`` (0: off).
    worker_ports_base: int = 0
    #: Host of the per-worker ports; default: the host of Gunicorn's first bind.
    worker_ports_host: str = ""

    # -- accepting
    #: The primary accepts connections and hands each to the worker with the most
    #: free threads, instead of whichever worker the kernel wakes. None (default): for
    #: gthread workers; True: sync workers too; False: Gunicorn's own accept everywhere.
    even_spread: bool | None = None

    # -- sticky routing (nginx pins a client to the backend its route cookie names)
    #: Set the route cookie on the responses of any WSGI app Gunicorn serves (a
    #: middleware the worker hooks put around it). None (default): on when
    #: ``worker_ports_base`` is set, the cookie naming the worker's own port; True:
    #: always (without per-worker ports it names the instance: GX_ROUTE, else its first
    #: bind); False: never. An app wrapped in its own RouteCookie keeps that one.
    sticky: bool | None = None
    #: Name of the route cookie (nginx's ``$cookie_<name>``; give the same to
    #: ``gunicorn-ext nginx render --cookie``).
    sticky_cookie: str = "gx_route"

    # -- status and metrics
    #: How often each worker reports its counters to the primary (seconds).
    stats_interval: float = 1.0
    #: Serve ``gunicorn-ext status``/``reload``/``scale`` on a 0600 unix socket
    #: in a private directory ($XDG_RUNTIME_DIR/gunicorn-ext or /tmp/gunicorn-ext-UID).
    control_socket: bool = True

    # -- admin endpoint (served by the primary itself, see gunicorn_ext/admin.py)
    #: ``"host:port"`` where the primary serves ``GET /metrics``, ``/status``,
    #: ``/livez`` and ``/readyz`` over HTTP, answering even while every worker is
    #: busy. Empty: off. Loopback only unless ``admin_allow_remote`` is True.
    admin_bind: str = ""
    #: Let ``admin_bind`` be a non-loopback address. The endpoint has no
    #: authentication: firewall it so only Prometheus and the probes reach it.
    admin_allow_remote: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("memory_soft_limit", "memory_hard_limit", "ipc_max_frame", "ipc_max_backlog"):
                object.__setattr__(self, f.name, parse_size(f.name, value))
            elif f.type in ("int",) and (not isinstance(value, int) or isinstance(value, bool)):
                raise SettingsError(f"gunicorn-ext setting {f.name} must be an integer, got {value!r}")
            elif f.type in ("float",):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise SettingsError(f"gunicorn-ext setting {f.name} must be a number, got {value!r}")
                if value < 0:
                    raise SettingsError(f"gunicorn-ext setting {f.name} must not be negative, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif f.type in ("bool",) and not isinstance(value, bool):
                raise SettingsError(f"gunicorn-ext setting {f.name} must be True or False, got {value!r}")
        self._check()

    def _check(self) -> None:
        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"gunicorn-ext setting {name} {why}, got {getattr(self, name)!r}")

        if not 1024 <= self.ipc_max_frame <= 1 << 30:
            raise bad("ipc_max_frame", "must be between 1024 and 2**30 bytes")
        if self.ipc_max_backlog < self.ipc_max_frame:
            raise bad("ipc_max_backlog", f"must be at least ipc_max_frame ({self.ipc_max_frame})")
        if self.restart_backoff_factor < 1:
            raise bad("restart_backoff_factor", "must be at least 1")
        if self.restart_max_delay < self.restart_delay:
            raise bad("restart_max_delay", f"must be at least restart_delay ({self.restart_delay})")
        if self.restart_breaker_failures < 0:
            raise bad("restart_breaker_failures", "must be 0 (off) or more")
        if self.restart_breaker_failures and self.restart_breaker_window <= 0:
            raise bad("restart_breaker_window", "must be positive")
        if self.restart_breaker_cooldown <= 0:
            raise bad("restart_breaker_cooldown", "must be positive")
        if self.restart_breaker_max_cooldown < self.restart_breaker_cooldown:
            raise bad("restart_breaker_max_cooldown",
                      f"must be at least restart_breaker_cooldown ({self.restart_breaker_cooldown})")
        if self.restart_breaker_scope not in ("slot", "instance"):
            raise bad("restart_breaker_scope", "must be 'slot' or 'instance'")
        if self.restart_breaker_action not in ("hold", "exit"):
            raise bad("restart_breaker_action", "must be 'hold' or 'exit'")
        if self.memory_hard_limit and self.memory_soft_limit > self.memory_hard_limit:
            raise bad("memory_soft_limit", f"must not exceed memory_hard_limit ({self.memory_hard_limit})")
        if self.memory_check_interval <= 0:
            raise bad("memory_check_interval", "must be positive")
        if self.reload_batch < 1:
            raise bad("reload_batch", "must be at least 1")
        if self.reload_ready_timeout <= 0:
            raise bad("reload_ready_timeout", "must be positive")
        if self.worker_ports_base and not 1 <= self.worker_ports_base <= 65535:
            raise bad("worker_ports_base", "must be 0 (off) or a port number")
        if self.stats_interval <= 0:
            raise bad("stats_interval", "must be positive")
        if self.admin_bind != "":
            host, _ = parse_address("admin_bind", self.admin_bind)
            if not self.admin_allow_remote and not is_loopback(host):
                raise bad("admin_bind", "must be a loopback address (127.0.0.1, [::1], localhost) "
                                        "unless admin_allow_remote=True")
        if not (self.even_spread is None or isinstance(self.even_spread, bool)):
            raise bad("even_spread", "must be True, False or None (gthread workers only)")
        if not (self.sticky is None or isinstance(self.sticky, bool)):
            raise bad("sticky", "must be True, False or None (on with per-worker ports)")
        if not isinstance(self.sticky_cookie, str) or not COOKIE_NAME_RE.match(self.sticky_cookie):
            raise bad("sticky_cookie", "must be 1-64 characters of [A-Za-z0-9_] (an nginx "
                      "variable name: $cookie_<name>)")

    @property
    def sticky_on(self) -> bool:
        """Whether the worker hooks set the route cookie (``sticky``, resolved)."""
        return bool(self.worker_ports_base) if self.sticky is None else self.sticky

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Settings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SettingsError(
                f"unknown gunicorn-ext setting(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}")
        return cls(**kwargs)
