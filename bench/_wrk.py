"""wrk, the HTTP load generator the benchmarks share: one run, its output parsed.

A helper module (the leading underscore keeps ``make bench`` from running it).
"""

from __future__ import annotations

import re
import subprocess
from typing import Any


def run(wrk: str, url: str, seconds: float, connections: int,
        headers: tuple[str, ...] = ()) -> dict[str, Any]:
    """One wrk run (1 thread, *connections* connections, whole *seconds*) against *url*.

    Returns ``rps``, ``requests`` (completed, None if wrk didn't say), ``non_2xx`` and
    ``socket_errors`` (``connect``/``read``/``write``/``timeout`` counts, empty if none).
    Raises RuntimeError when wrk fails or prints no Requests/sec.
    """
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    for header in headers:
        cmd += ["-H", header]
    cmd.append(url)
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                        stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise RuntimeError(f"wrk failed (rc={cp.returncode}): {(cp.stderr or cp.stdout)[-1000:]}")
    m = re.search(r"Requests/sec:\s*([\d.]+)", cp.stdout)
    if not m:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{cp.stdout}")
    reqs = re.search(r"(\d+) requests in", cp.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", cp.stdout)
    sock_err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                         cp.stdout)
    return {
        "rps": float(m.group(1)),
        "requests": int(reqs.group(1)) if reqs else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": ({k: int(v) for k, v in zip(("connect", "read", "write", "timeout"),
                                                       sock_err.groups(), strict=True)}
                          if sock_err else {}),
    }
