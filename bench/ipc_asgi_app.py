"""ASGI app used by bench/ipc.py: the async bus API measured inside a ``-k asgi`` worker."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs

from gunicorn_ext import worker


async def _rtt(n: int) -> dict[str, Any]:
    for _ in range(min(n // 10, 2000)):  # warm up
        await worker.arequest("ping", 1)
    lat = []
    req = worker.arequest
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        await req("ping", i)
        lat.append(clock() - t0)
    lat.sort()
    return {"p50_us": lat[n // 2] / 1000, "p99_us": lat[int(n * 0.99)] / 1000, "n": n}


async def _oneway(n: int) -> dict[str, Any]:
    await worker.arequest("reset")
    send = worker.asend
    t0 = time.perf_counter()
    for i in range(n):
        await send("count", i)
    got = await worker.arequest("total", timeout=60.0)  # ordered after every send
    elapsed = time.perf_counter() - t0
    assert got == n, (got, n)
    return {"msgs_per_s": n / elapsed, "n": n, "seconds": elapsed}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    qs = parse_qs(scope.get("query_string", b"").decode())
    n = int(qs.get("n", ["10000"])[0])
    if scope["path"] == "/rtt":
        data = json.dumps(await _rtt(n)).encode()
    elif scope["path"] == "/oneway":
        data = json.dumps(await _oneway(n)).encode()
    else:
        data = b"ok"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
