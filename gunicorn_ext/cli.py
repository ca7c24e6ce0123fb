"""The ``gunicorn-ext`` command: status, rolling reload and scaling of a running instance.

Every subcommand talks to a primary over its control socket
(:mod:`gunicorn_ext.control`). Without ``--socket`` the only instance of the
current user is used; with several running the command says which to pick.

Exit codes: 0 success, 1 failure (one line on stderr, no traceback), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import __version__
from .control import ControlError, call, find_socket

#: Seconds between status polls while following a rolling reload.
POLL_INTERVAL = 0.2
_LIVE_STATES = ("booting", "ready", "draining")


# ---------------------------------------------------------------- formatting


def human_duration(seconds: float | None) -> str:
    """``42s``, ``5m07s``, ``1h02m``, ``3d04h``."""
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def human_bytes(n: float | None) -> str:
    """``512B``, ``12.3K``, ``12.3M``, ``1.2G`` (powers of 1024)."""
    if n is None:
        return "-"
    value = float(n)
    if value < 1024:
        return f"{int(value)}B"
    for unit in "KMGT":
        value /= 1024
        if value < 1024 or unit == "T":
            break
    return f"{value:.1f}{unit}"


def _num(value: Any) -> str:
    return "-" if value is None else str(value)


def _state(w: dict[str, Any]) -> str:
    """The state cell, with the restart breaker when it is not closed."""
    state = str(w.get("state", "?"))
    breaker = w.get("breaker")
    if breaker == "open":
        return f"{state} (breaker open, retry in {human_duration(w.get('breaker_retry_in'))})"
    if breaker == "half-open":
        return f"{state} (breaker half-open)"
    return state


def format_status(status: dict[str, Any]) -> str:
    """Render a ``status`` response as a header line and a ``pm2 ls``-like table."""
    workers = sorted(status.get("workers") or [], key=lambda w: w.get("slot", 0))
    live = sum(1 for w in workers if w.get("pid") and w.get("state") in _LIVE_STATES)
    header = [
        f"instance {status.get('instance', '?')}",
        f"primary {status.get('primary_pid', '?')}",
        f"up {human_duration(status.get('uptime'))}",
        f"workers {live}/{status.get('workers_target', '?')}",
    ]
    if status.get("listening") is False:
        header.append("not listening (no worker: connections are refused)")
    rollout = status.get("rollout") or {}
    if rollout.get("state", "idle") != "idle":
        text = (f"rollout {rollout.get('state')} {rollout.get('done', 0)}/{rollout.get('total', 0)}"
                f" (batch {rollout.get('batch', '?')})")
        if rollout.get("message"):
            text += f": {rollout['message']}"
        header.append(text)

    columns = ["SLOT", "PID", "STATE", "UPTIME", "REQS", "INFLIGHT", "RSS", "CPU%", "RESTARTS",
               "LAST EXIT"]
    left = {"STATE", "LAST EXIT"}
    rows: list[list[str]] = []
    for w in workers:
        running = bool(w.get("pid"))
        cpu = w.get("cpu")
        rows.append([
            _num(w.get("slot")),
            str(w["pid"]) if running else "-",
            _state(w),
            human_duration(w.get("uptime")) if running else "-",
            _num(w.get("requests")),
            _num(w.get("inflight")) if running else "-",
            human_bytes(w.get("rss")) if running else "-",
            f"{cpu:.1f}" if running and isinstance(cpu, (int, float)) else "-",
            _num(w.get("restarts")),
            w.get("last_exit") or "-",
        ])
    totals = status.get("totals") or {}
    rows.append(["TOTAL", "", "", "", _num(totals.get("requests")), _num(totals.get("inflight")),
                 human_bytes(totals.get("rss")), "", _num(totals.get("restarts")), ""])

    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        out = []
        for i, (cell, col) in enumerate(zip(cells, columns, strict=True)):
            if i == len(columns) - 1:
                out.append(cell)
            elif col in left or i == 0:
                out.append(cell.ljust(widths[i]))
            else:
                out.append(cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join(["  ".join(header), "", line(columns), *(line(r) for r in rows)])


# ------------------------------------------------------------------ commands


def _request(args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Call ``cmd`` on the chosen instance; an ``{"error": ...}`` answer raises ControlError."""
    if getattr(args, "_path", None) is None:
        args._path = find_socket(args.socket)
    resp = call(args._path, cmd, cmd_args)
    if "error" in resp:
        raise ControlError(str(resp["error"]))
    return resp


def _cmd_status(args: argparse.Namespace) -> int:
    status = _request(args, "status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    if not args.rolling:
        print("gunicorn-ext reload: only --rolling is supported; Gunicorn's own reload (all "
              "workers at once) is a HUP to the primary: kill -HUP <primary pid>", file=sys.stderr)
        return 2
    # Without --batch the primary uses its configured batch size.
    resp = _request(args, "reload", {} if args.batch is None else {"batch": args.batch})
    rollout: dict[str, Any] = resp.get("rollout") or {}
    total, batch = rollout.get("total"), args.batch or rollout.get("batch")
    detail = f": {total} workers, {batch} at a time" if total and batch else ""
    print(f"rolling reload started{detail}", flush=True)
    deadline = time.monotonic() + args.timeout
    shown = (rollout.get("done", 0), total)
    try:
        while True:
            state = rollout.get("state")
            progress = (rollout.get("done", 0), rollout.get("total"))
            if progress != shown and progress[1]:
                print(f"replaced {progress[0]}/{progress[1]} workers", flush=True)
                shown = progress
            if state == "done":
                print("rolling reload done" + (f": {rollout['message']}" if rollout.get("message") else ""))
                return 0
            if state == "failed":
                print(f"gunicorn-ext reload: rolling reload failed: "
                      f"{rollout.get('message') or 'no reason given'}", file=sys.stderr)
                return 1
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"gunicorn-ext reload: gave up waiting after {args.timeout:g} s (rollout "
                      f"{state or 'unknown'}, {progress[0]}/{_num(progress[1])} replaced); it goes "
                      "on in the primary: follow it with `gunicorn-ext status`", file=sys.stderr)
                return 1
            time.sleep(min(POLL_INTERVAL, left))
            rollout = _request(args, "status").get("rollout") or {}
    except KeyboardInterrupt:
        print("\ninterrupted; the rolling reload goes on in the primary", file=sys.stderr)
        return 130


def _cmd_scale(args: argparse.Namespace) -> int:
    resp = _request(args, "scale", {"workers": args.workers})
    if resp.get("message"):
        print(resp["message"])
    elif "previous" in resp:
        print(f"workers: {resp['previous']} -> {resp.get('workers_target', args.workers)}")
    else:
        print(f"scaling to {resp.get('workers_target', resp.get('workers', args.workers))} workers")
    return 0


def _cmd_nginx_render(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .nginx import Failover, render

    try:
        failover = Failover(**{f.name: getattr(args, f.name) for f in fields(Failover)
                               if getattr(args, f.name) is not None})
        text = render(args.backend, args.listen, args.server_name, route_names=args.route,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, http_port=args.http_port,
                      default_server=not args.no_default_server, cookie=args.cookie,
                      failover=failover)
    except ValueError as exc:
        print(f"gunicorn-ext nginx render: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def _cmd_nginx_check(args: argparse.Namespace) -> int:
    from .nginx import check

    problems = check(args.file, gixy=not args.no_gixy)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.file}: ok")
    return 0


def _port_arg(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {value}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (e.g. 1, 0.5, 30), got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _add_failover(p: argparse.ArgumentParser) -> None:
    """The fields of :class:`gunicorn_ext.nginx.Failover` as options (default: its own)."""
    from .nginx import Failover

    d = Failover()
    g = p.add_argument_group("failover", "timeouts, retries and ejection (seconds; the "
                             "README's 'Failover' section says why each default)")
    g.add_argument("--connect-timeout", type=_seconds_arg, metavar="S",
                   help=f"proxy_connect_timeout: a host this silent is gone (default {d.connect_timeout:g})")
    g.add_argument("--read-timeout", type=_seconds_arg, metavar="S",
                   help="proxy_read/send_timeout of plain HTTP: above your slowest endpoint "
                   f"(default {d.read_timeout:g})")
    g.add_argument("--stream-timeout", type=_seconds_arg, metavar="S",
                   help="the same for /socket.io/ and /ws: well above the ping interval "
                   f"(default {d.stream_timeout:g})")
    g.add_argument("--next-upstream-tries", type=_count_arg, metavar="N",
                   help=f"attempts per request, 0: no limit (default {d.next_upstream_tries})")
    g.add_argument("--next-upstream-timeout", type=_seconds_arg, metavar="S",
                   help="no retry starts later than this, 0: no limit "
                   f"(default {d.next_upstream_timeout:g}, below --read-timeout)")
    g.add_argument("--max-fails", type=_count_arg, metavar="N",
                   help=f"failed attempts that take a backend out, 0: never (default {d.max_fails})")
    g.add_argument("--fail-timeout", type=_seconds_arg, metavar="S",
                   help=f"with --max-fails: how long it stays out (default {d.fail_timeout:g})")
    g.add_argument("--idle-timeout", type=_seconds_arg, metavar="S",
                   help="idle upstream connections closed after this, below Gunicorn's "
                   f"keepalive (default {d.idle_timeout:g})")
    g.add_argument("--no-socket-keepalive", dest="socket_keepalive", action="store_const",
                   const=False, default=None,
                   help="leave out proxy_socket_keepalive (TCP keepalive to the backends)")


def _add_nginx(commands: Any) -> None:
    nginx = commands.add_parser("nginx", help="render and check nginx configs",
                                description="nginx in front of Gunicorn instances.")
    sub = nginx.add_subparsers(dest="nginx_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("render", help="print an http-context config for conf.d",
                       description="Print one http-context nginx config (upstreams, sticky "
                       "route map, server blocks) on stdout. Each backend must set the cookie "
                       "gx_route (or --cookie) to its route name (default: HOST:PORT with "
                       "[^a-z0-9_] -> _); gunicorn-ext's sticky setting does, with per-worker "
                       "ports.")
    p.add_argument("--backend", action="append", required=True, metavar="HOST:PORT",
                   help="a Gunicorn instance (or per-worker port); repeat for several")
    p.add_argument("--listen", type=_port_arg, required=True, metavar="PORT",
                   help="port nginx listens on (the HTTPS port with --tls-cert)")
    p.add_argument("--server-name", required=True, metavar="NAME", help="e.g. example.com")
    p.add_argument("--route", action="append", metavar="NAME",
                   help="route name of each --backend, in order ([a-z0-9_])")
    p.add_argument("--cookie", default="gx_route", metavar="NAME",
                   help="the route cookie's name: the backends' sticky_cookie (default gx_route)")
    p.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="private key (PEM)")
    p.add_argument("--http-port", type=_port_arg, default=80, metavar="PORT",
                   help="with TLS: plain HTTP port redirecting to HTTPS (default 80)")
    p.add_argument("--no-default-server", action="store_true",
                   help="leave out the catch-all server answering unknown hosts with 444")
    _add_failover(p)
    p.set_defaults(func=_cmd_nginx_render)
    p = sub.add_parser("check", help="nginx -t (and gixy-ng when installed) on a file",
                       description="Check an http-context config with nginx -t in a throw-away "
                       "wrapper (as non-root, /etc/nginx untouched) and gixy-ng (medium/high).")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--no-gixy", action="store_true", help="skip gixy-ng")
    p.set_defaults(func=_cmd_nginx_check)


# -------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. A subcommand sets ``func(args) -> int`` as its default.

    New subcommand groups (``nginx ...``) are added to ``commands`` the same way.
    """
    parser = argparse.ArgumentParser(
        prog="gunicorn-ext",
        description="Inspect and control running gunicorn-ext instances.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    instance = argparse.ArgumentParser(add_help=False)
    instance.add_argument(
        "--socket", metavar="PATH",
        help="control socket of the instance (default: the only instance of this user)")

    p = commands.add_parser("status", parents=[instance], help="workers, their state and resources",
                            description="Show the instance's workers (like pm2 ls).")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=_cmd_status)

    p = commands.add_parser("reload", parents=[instance], help="replace workers N at a time",
                            description="Replace every worker, a batch at a time; each new "
                            "worker is ready before an old one stops.")
    p.add_argument("--rolling", action="store_true", help="rolling reload (required)")
    p.add_argument("--batch", type=_positive_int, metavar="N",
                   help="workers replaced at a time (default: the instance's reload_batch setting)")
    p.add_argument("--timeout", type=_positive_float, default=300.0, metavar="S",
                   help="seconds to wait for the rollout to finish (default 300)")
    p.set_defaults(func=_cmd_reload)

    p = commands.add_parser("scale", parents=[instance], help="set the number of workers",
                            description="Set the number of workers.")
    p.add_argument("workers", type=_positive_int, metavar="N", help="number of workers (>= 1)")
    p.set_defaults(func=_cmd_scale)

    _add_nginx(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gunicorn-ext`` command; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return int(args.func(args))
    except ControlError as exc:
        print(f"gunicorn-ext {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
