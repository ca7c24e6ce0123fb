"""Every gunicorn-ext setting, declared in one place, the way Gunicorn declares its own.

Settings are keyword arguments of :func:`gunicorn_ext.enable`. A bad value
stops Gunicorn at startup with a message naming the setting. Sizes accept an
int (bytes) or a string such as ``"512M"``; durations are seconds.

Each setting is a field of :class:`Settings` declared with :func:`setting`:
its type (the annotation), its default, a named validator and a doc line
(what the docs' settings page and the README's table show)::

    reload_batch: int = setting(1, validate_pos_int, "Workers replaced at a time.")

A field declared the plain dataclass way (``name: int = 0``) is still checked
against its annotation (``_BY_TYPE``), but tests/test_settings.py fails until it
is declared with :func:`setting`.

A validator takes ``(name, value)`` and returns the value to keep (converted,
e.g. ``"512M"`` to bytes) or raises :class:`SettingsError` naming the setting.
Checks between settings (a maximum at least its minimum) are in
``Settings._check``. Gunicorn's own settings keep their meaning:
``max_requests`` and ``max_requests_jitter`` recycle by request count,
``timeout`` detects hung workers, ``workers`` is the slot count.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .sticky import COOKIE_NAME_RE

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_BRIDGE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
#: URL schemes the bus bridge accepts (the Redis store's).
BRIDGE_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel",
                  "redis+cluster", "rediss+cluster")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*$")

T = TypeVar("T")
#: ``validator(name, value) -> value``: the value to keep, or SettingsError.
Validator = Callable[[str, Any], Any]


class SettingsError(ValueError):
    """A gunicorn-ext setting has an invalid value."""


def _bad(name: str, why: str, value: Any) -> SettingsError:
    return SettingsError(f"gunicorn-ext setting {name} {why}, got {value!r}")


def setting(default: T, validate: Validator, doc: str) -> T:
    """Declare a field of :class:`Settings`: its default, named validator and doc line."""
    return field(default=default, metadata={"validate": validate, "doc": " ".join(doc.split())})


# -- validators (each named, each naming the setting in its error) -------------------


def parse_size(name: str, value: Any) -> int:
    """Bytes from an int or a string like ``"512M"``; 0 means off."""
    if isinstance(value, bool):
        raise SettingsError(f"gunicorn-ext setting {name} must be a size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise _bad(name, "must be bytes or a size like '512M'", value)
    if size < 0:
        raise _bad(name, "must not be negative", value)
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


validate_size = parse_size


def validate_frame_size(name: str, value: Any) -> int:
    """A size between 1 KiB and 1 GiB."""
    size = parse_size(name, value)
    if not 1024 <= size <= 1 << 30:
        raise _bad(name, "must be between 1024 and 2**30 bytes", value)
    return size


def validate_bool(name: str, value: Any) -> bool:
    """True or False (not 1, not "yes")."""
    if not isinstance(value, bool):
        raise _bad(name, "must be True or False", value)
    return value


def validate_auto_bool(name: str, value: Any) -> bool | None:
    """True, False, or None (decided from other settings)."""
    if value is not None and not isinstance(value, bool):
        raise _bad(name, "must be True, False or None", value)
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, "must be a number", value)
    if value != value:  # NaN passes every comparison below
        raise _bad(name, "must be a number", value)
    return float(value)


def validate_non_negative(name: str, value: Any) -> float:
    """A number of seconds (or a ratio), 0 or more; 0 usually means off."""
    number = _number(name, value)
    if number < 0:
        raise _bad(name, "must not be negative", value)
    return number


def validate_positive(name: str, value: Any) -> float:
    """A number of seconds, more than 0."""
    number = _number(name, value)
    if number <= 0:
        raise _bad(name, "must be positive", value)
    return number


def validate_factor(name: str, value: Any) -> float:
    """A multiplier, at least 1."""
    number = _number(name, value)
    if number < 1:
        raise _bad(name, "must be at least 1", value)
    return number


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "must be an integer", value)
    return value


def validate_non_negative_int(name: str, value: Any) -> int:
    """An integer, 0 (off) or more."""
    if _integer(name, value) < 0:
        raise _bad(name, "must be 0 (off) or more", value)
    return int(value)


def validate_pos_int(name: str, value: Any) -> int:
    """An integer, at least 1."""
    if _integer(name, value) < 1:
        raise _bad(name, "must be at least 1", value)
    return int(value)


def validate_port_or_off(name: str, value: Any) -> int:
    """0 (off) or a TCP port number."""
    port = _integer(name, value)
    if port and not 1 <= port <= 65535:
        raise _bad(name, "must be 0 (off) or a port number", value)
    return port


def validate_host(name: str, value: Any) -> str:
    """'' (a default chosen elsewhere), a host name, or an IPv4/IPv6 address (no brackets)."""
    if not isinstance(value, str):
        raise _bad(name, "must be a string (a host name or an IP address)", value)
    if value == "" or _HOSTNAME.match(value):
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _bad(name, "must be a host name or an IP address (IPv6 without brackets)", value)
    return value


def validate_cookie_name(name: str, value: Any) -> str:
    """A cookie name nginx can read as ``$cookie_<name>``."""
    if not isinstance(value, str) or not COOKIE_NAME_RE.match(value):
        raise _bad(name, "must be 1-64 characters of [A-Za-z0-9_] (an nginx variable name: "
                   "$cookie_<name>)", value)
    return value


def validate_breaker_scope(name: str, value: Any) -> str:
    """'slot' or 'instance'."""
    if value not in ("slot", "instance") or not isinstance(value, str):
        raise _bad(name, "must be 'slot' or 'instance'", value)
    return value


def validate_breaker_action(name: str, value: Any) -> str:
    """'hold' or 'exit'."""
    if value not in ("hold", "exit") or not isinstance(value, str):
        raise _bad(name, "must be 'hold' or 'exit'", value)
    return value


def validate_int(name: str, value: Any) -> int:
    """Any integer."""
    return _integer(name, value)


def validate_bridge_url(name: str, value: Any) -> str:
    """'' (off) or a Redis store URL; the error never echoes the URL (it may hold a password)."""
    if not isinstance(value, str):
        raise _bad(name, "must be a string (a Redis store URL) or ''", value)
    if value and urlsplit(value).scheme.lower() not in BRIDGE_SCHEMES:
        raise SettingsError(
            f"gunicorn-ext setting {name} must be a Redis store URL ("
            + ", ".join(f"{s}://" for s in BRIDGE_SCHEMES) + f") or '', got scheme "
            f"{urlsplit(value).scheme!r}")
    return value


def validate_bridge_name(name: str, value: Any) -> str:
    """'' (Gunicorn's proc_name) or 1-100 characters of ``[A-Za-z0-9_.:-]``."""
    if not isinstance(value, str) or (value and not _BRIDGE_NAME.match(value)):
        raise _bad(name, "must be 1-100 characters of [A-Za-z0-9_.:-] or ''", value)
    return value


def validate_hup(name: str, value: Any) -> str:
    """``"gunicorn"`` or ``"rolling"``."""
    if value not in ("gunicorn", "rolling"):
        raise _bad(name, "must be 'gunicorn' or 'rolling'", value)
    return str(value)


def validate_admin_bind(name: str, value: Any) -> str:
    """Empty (off) or ``"host:port"`` (see :func:`parse_address`)."""
    if value == "":
        return value
    parse_address(name, value)
    return str(value).strip()


def validate_string(name: str, value: Any) -> str:
    """Any string."""
    if not isinstance(value, str):
        raise _bad(name, "must be a string", value)
    return value


#: The validator of a field declared without :func:`setting`, by its annotation.
_BY_TYPE: dict[str, Validator] = {
    "int": validate_int, "float": validate_non_negative, "bool": validate_bool,
    "str": validate_string, "bool | None": validate_auto_bool,
}


# -- the settings -------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The gunicorn-ext settings of one Gunicorn instance (keywords of ``enable()``)."""

    # -- bus
    ipc_max_frame: int = setting(4 * 1024 * 1024, validate_frame_size, """
        Largest bus frame accepted, in bytes. A bigger one closes the sender's connection
        with a logged reason.""")
    ipc_max_backlog: int = setting(64 * 1024 * 1024, validate_size, """
        Bytes the primary may queue for a worker that is not reading its bus before it
        gives up on that worker's connection.""")
    bus_bridge_url: str = setting("", validate_bridge_url, """
        Store URL of a Redis (redis://, rediss://, unix://, redis[s]+sentinel://,
        redis[s]+cluster://) through which publications reach the subscribers of every
        instance of the same ``bus_bridge_name``: one connection per primary. "": off.""")
    bus_bridge_name: str = setting("", validate_bridge_name, """
        The cluster's name on the bridge; default: Gunicorn's ``proc_name``.""")

    # -- restart policy (PM2's exponential backoff, plus a breaker)
    restart_delay: float = setting(0.1, validate_non_negative, """
        Delay before respawning a slot whose worker crashed twice in a row (seconds); the
        first crash respawns at once.""")
    restart_backoff_factor: float = setting(1.5, validate_factor, """
        Each further crash multiplies the delay by this.""")
    restart_max_delay: float = setting(15.0, validate_non_negative, """
        The delay never exceeds this.""")
    restart_stable_after: float = setting(30.0, validate_non_negative, """
        A worker that lived this long before exiting resets its slot's backoff.""")
    restart_breaker_failures: int = setting(10, validate_non_negative_int, """
        This many unstable exits of a slot within ``restart_breaker_window`` open the
        breaker: the slot (or the instance) stops respawning. 0 disables it.""")
    restart_breaker_window: float = setting(60.0, validate_non_negative, """
        The window (seconds) in which ``restart_breaker_failures`` unstable exits open
        the breaker.""")
    restart_min_uptime: float = setting(1.0, validate_non_negative, """
        Unstable exits: a boot failure, an exit before the worker reported ready, or one
        within this many seconds after it (PM2's min_uptime). A worker that reported ready
        and was then killed by a signal never counts.""")
    restart_breaker_cooldown: float = setting(30.0, validate_positive, """
        An open breaker waits this long, then tries one worker (half-open): it closes once
        that worker has been ready ``restart_min_uptime`` seconds, and each failed try
        doubles the wait, up to ``restart_breaker_max_cooldown``.""")
    restart_breaker_max_cooldown: float = setting(300.0, validate_positive, """
        The longest wait of an open breaker between tries.""")
    restart_breaker_scope: str = setting("slot", validate_breaker_scope, """
        "slot": only the crashing slot stops; "instance": every slot stops.""")
    restart_breaker_action: str = setting("hold", validate_breaker_action, """
        "hold": the primary keeps running (with what still serves, refusing connections
        while no worker runs) and retries after the cool-down; "exit": the primary shuts
        down with exit status 1.""")
    halt_on_boot_error: bool = setting(True, validate_bool, """
        Keep Gunicorn's behaviour of shutting down when a worker fails to boot (app import
        error). Off: such a failure is a crash like any other and goes through backoff and
        the breaker. During a rolling reload a boot failure never shuts down: the rollout
        stops and old workers keep serving.""")

    # -- recycling
    memory_soft_limit: int = setting(0, validate_size, """
        RSS above which a worker finishes its in-flight requests, exits and is replaced.
        Checked after each request and every ``memory_check_interval``. 0 disables.""")
    memory_hard_limit: int = setting(0, validate_size, """
        RSS above which the primary stops a worker: TERM, then KILL after
        ``memory_hard_grace`` seconds. 0 disables.""")
    memory_hard_grace: float = setting(10.0, validate_non_negative, """
        Seconds between the TERM and the KILL of a worker above ``memory_hard_limit``.""")
    memory_check_interval: float = setting(1.0, validate_positive, """
        How often (seconds) the workers' RSS is checked.""")
    max_lifetime: float = setting(0.0, validate_non_negative, """
        A worker older than this (plus up to ``max_lifetime_jitter``, random per worker)
        exits gracefully and is replaced. 0 disables.""")
    max_lifetime_jitter: float = setting(0.0, validate_non_negative, """
        Up to this many seconds, random per worker, added to ``max_lifetime``.""")

    # -- request deadlines
    request_timeout: float = setting(0.0, validate_non_negative, """
        A request running longer than this (seconds) has its stack logged, gets 503 when
        nothing was sent yet, and its worker is recycled gracefully. 0: off. WebSocket
        upgrades are exempt.""")

    # -- rolling reload
    reload_batch: int = setting(1, validate_pos_int, """
        Workers replaced at a time by ``gunicorn-ext reload --rolling``.""")
    reload_ready_timeout: float = setting(60.0, validate_positive, """
        How long a new worker may take to report ready before the rollout stops.""")
    hup: str = setting("gunicorn", validate_hup, """
        What SIGHUP (``systemctl reload``) does. "gunicorn": Gunicorn's own reload (re-read
        the config, start every new worker, stop every old one at once). "rolling": re-read
        the config, then replace workers ``reload_batch`` at a time, each old one stopped
        only when its replacement is ready; a config that changes a setting needing a
        restart (bind, worker_class, even_spread, ...) is refused and nothing changes.""")

    # -- per-worker ports (for nginx to pin a client to one worker)
    worker_ports_base: int = setting(0, validate_port_or_off, """
        When set, slot N also listens on port ``worker_ports_base + N`` (0: off).""")
    worker_ports_host: str = setting("", validate_host, """
        Host of the per-worker ports; default: the host of Gunicorn's first bind.""")

    # -- accepting
    even_spread: bool | None = setting(None, validate_auto_bool, """
        The primary accepts connections and hands each to the worker with the most free
        threads, instead of whichever worker the kernel wakes; a gthread worker busier than
        the others answers some kept-alive requests with ``Connection: close``, so their
        clients come back through the primary. None (default): gthread workers; True: sync
        workers too; False: Gunicorn's own accept and keep-alive everywhere.""")

    # -- sticky routing (nginx pins a client to the backend its route cookie names)
    sticky: bool | None = setting(None, validate_auto_bool, """
        Set the route cookie on the responses of any WSGI app Gunicorn serves (a middleware
        the worker hooks put around it). None (default): on when ``worker_ports_base`` is
        set, the cookie naming the worker's own port; True: always (without per-worker
        ports it names the instance: GX_ROUTE, else its first bind); False: never. An app
        wrapped in its own RouteCookie keeps that one.""")
    sticky_cookie: str = setting("gx_route", validate_cookie_name, """
        Name of the route cookie (nginx's ``$cookie_<name>``; give the same to
        ``gunicorn-ext nginx render --cookie``).""")

    # -- status and metrics
    stats_interval: float = setting(1.0, validate_positive, """
        How often each worker reports its counters to the primary (seconds).""")
    control_socket: bool = setting(True, validate_bool, """
        Serve ``gunicorn-ext status``/``reload``/``scale`` on a 0600 unix socket in a
        private directory ($XDG_RUNTIME_DIR/gunicorn-ext or /tmp/gunicorn-ext-UID).""")

    # -- admin endpoint (served by the primary itself, see gunicorn_ext/admin.py)
    admin_bind: str = setting("", validate_admin_bind, """
        ``"host:port"`` where the primary serves ``GET /metrics``, ``/status``, ``/livez``
        and ``/readyz`` over HTTP, answering even while every worker is busy. Empty: off.
        Loopback only unless ``admin_allow_remote`` is True.""")
    admin_allow_remote: bool = setting(False, validate_bool, """
        Let ``admin_bind`` be a non-loopback address. The endpoint has no authentication:
        firewall it so only Prometheus and the probes reach it.""")

    def __post_init__(self) -> None:
        for f in fields(self):
            validate = f.metadata.get("validate") or _BY_TYPE.get(str(f.type), validate_string)
            object.__setattr__(self, f.name, validate(f.name, getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
        """The checks between settings."""
        def bad(name: str, why: str) -> SettingsError:
            return _bad(name, why, getattr(self, name))

        if self.ipc_max_backlog < self.ipc_max_frame:
            raise bad("ipc_max_backlog", f"must be at least ipc_max_frame ({self.ipc_max_frame})")
        if self.restart_max_delay < self.restart_delay:
            raise bad("restart_max_delay", f"must be at least restart_delay ({self.restart_delay})")
        if self.restart_breaker_failures and self.restart_breaker_window <= 0:
            raise bad("restart_breaker_window", "must be positive")
        if self.restart_breaker_max_cooldown < self.restart_breaker_cooldown:
            raise bad("restart_breaker_max_cooldown",
                      f"must be at least restart_breaker_cooldown ({self.restart_breaker_cooldown})")
        if self.memory_hard_limit and self.memory_soft_limit > self.memory_hard_limit:
            raise bad("memory_soft_limit", f"must not exceed memory_hard_limit ({self.memory_hard_limit})")
        if self.admin_bind != "":
            host, _ = parse_address("admin_bind", self.admin_bind)
            if not self.admin_allow_remote and not is_loopback(host):
                raise bad("admin_bind", "must be a loopback address (127.0.0.1, [::1], localhost) "
                                        "unless admin_allow_remote=True")

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
