"""Per-worker ports: slot N also listens on ``worker_ports_base + N``.

Gunicorn's workers share one listening socket, so nothing outside can choose a
worker, which is why Flask-SocketIO's docs say a long-polling client can't be
run on more than one Gunicorn worker. With per-worker ports, nginx can pin a
client to one worker (its route cookie names the instance and the slot) while
the shared port keeps balancing everything else.

The port belongs to the slot, not the process: a replacement worker binds the
same port. SO_REUSEPORT lets the new worker of a rolling reload bind it while
the old one of the same slot is still draining.
"""

from __future__ import annotations

import socket
from typing import Any

from gunicorn import sock as gsock

from . import gunicorn_internals as gi
from .worker_record import slot_of


def bind_host(bind: list[str]) -> str:
    """The host of Gunicorn's first TCP bind address (127.0.0.1 when there is none)."""
    for addr in bind:
        if addr.startswith(("unix:", "fd://")):
            continue
        host = addr.rsplit(":", 1)[0] if ":" in addr else addr
        return host.strip("[]") or "127.0.0.1"
    return "127.0.0.1"


def open_worker_port(worker: Any, host: str, port: int) -> bool:
    """Add a listener on ``host:port`` to this worker's sockets (post_fork, in the worker).

    Returns False, with one log line, when the port can't be bound: the worker
    then serves the shared port only, it does not fail.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        worker.log.error("gunicorn-ext: worker slot port %s:%s not available (%s); this worker "
                         "serves the shared port only", host, port, exc)
        return False
    cls = gsock.TCP6Socket if family == socket.AF_INET6 else gsock.TCPSocket
    listener = cls((host, port), worker.cfg, worker.log, fd=sock.detach())
    gi.set_sockets(worker, [*gi.sockets_of(worker), listener])
    worker.log.info("gunicorn-ext: worker slot %s also listens on %s:%s",
                    slot_of(worker, "?"), host, port)
    return True
