"""WSGI app used by bench/ipc.py: measures the bus from inside a real worker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from gunicorn_ext import worker


def _rtt(n: int) -> dict[str, Any]:
    for _ in range(min(n // 10, 2000)):  # warm up
        worker.request("ping", 1)
    lat = []
    req = worker.request
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        req("ping", i)
        lat.append(clock() - t0)
    lat.sort()
    return {"p50_us": lat[n // 2] / 1000, "p99_us": lat[int(n * 0.99)] / 1000, "n": n}


def _oneway(n: int) -> dict[str, Any]:
    worker.request("reset")
    send = worker.send
    t0 = time.perf_counter()
    for i in range(n):
        send("count", i)
    got = worker.request("total", timeout=60.0)  # ordered after every send
    elapsed = time.perf_counter() - t0
    assert got == n, (got, n)
    return {"msgs_per_s": n / elapsed, "n": n, "seconds": elapsed}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ["PATH_INFO"]
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    n = int(qs.get("n", ["10000"])[0])
    if path == "/rtt":
        body = _rtt(n)
    elif path == "/oneway":
        body = _oneway(n)
    else:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [data]
