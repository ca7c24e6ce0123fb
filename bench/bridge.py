"""Bus bridge benchmark: cross-instance publish latency and throughput, beside baselines.

    .venv/bin/python bench/bridge.py       (also run by `make bench`)

One run, one real redis-server on a free loopback port, three roads from a publisher
to a subscriber in another "instance", each measured the same way:

1. the bus bridge: two hubs with their bridges (two primaries) in this process;
   ``hub_a.publish`` to a ``hub_b.subscribe`` callback (primary to primary: a worker's
   publication adds one bus hop to its primary, see bench/ipc.py);
2. redis-py pub/sub with a plain client: ``Redis.publish`` of the same msgpack bytes,
   read by a ``PubSub`` subscriber thread;
3. python-socketio's ``RedisManager``: ``emit`` from a write-only manager, received by
   a listening manager's pub/sub thread (its ``_handle_emit``, before any client).

Latency: one publication at a time, timed from the call to its arrival (p50/p99 over
BENCH_BRIDGE_N, default 2000). Throughput: BENCH_BRIDGE_BURST (default 20000)
publications as fast as the publisher goes, timed until the last arrives; the bridge
refuses (and tells) what its bounded send queue (10000) cannot hold, and those are
counted apart, not as delivered. Everything
runs in one process (one GIL for publisher and subscriber, as for each baseline), in
alternating rounds (BENCH_ROUNDS, default 3), medians reported. Writes
bench/results/bridge.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))

from harness import RedisServer  # noqa: E402

N = int(os.environ.get("BENCH_BRIDGE_N", "2000"))
BURST = int(os.environ.get("BENCH_BRIDGE_BURST", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
TIMEOUT = 60.0


class Road:
    """publish(i) sends publication i; arrivals are recorded by ``arrived``."""

    name = ""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()

    def arrived(self) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def wait(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        with self.cond:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name}: {self.count}/{count} arrived")
                self.cond.wait(left)

    def publish(self, i: int) -> None:
        raise NotImplementedError

    def refused(self) -> int:
        """Publications refused so far (the bridge's bounded send queue was full)."""
        return 0

    def close(self) -> None:
        pass


class _Log:
    def _x(self, *a: Any, **k: Any) -> None:
        pass

    debug = info = warning = error = exception = _x


class BridgeRoad(Road):
    name = "gunicorn-ext bus bridge"

    def __init__(self, url: str) -> None:
        super().__init__()
        from gunicorn_ext.ipc.hub import Hub

        self.a, self.b = Hub(), Hub()
        self.b.subscribe("bench")(lambda msg: self.arrived())
        for hub in (self.a, self.b):
            hub.start(_Log())
            hub.start_bridge(url, "bench")
        deadline = time.monotonic() + 10
        while not (self.a.bridge.up and self.b.bridge.up):
            if time.monotonic() > deadline:
                raise RuntimeError("the bridges did not come up")
            time.sleep(0.01)

    def publish(self, i: int) -> None:
        self.a.publish("bench", {"i": i, "text": "hello"})

    def refused(self) -> int:
        return int(self.a.bridge.refused)

    def close(self) -> None:
        self.a.stop()
        self.b.stop()


class RedisPyRoad(Road):
    name = "redis-py pub/sub"

    def __init__(self, url: str) -> None:
        super().__init__()
        import redis

        self.pub = redis.Redis.from_url(url)
        self.sub = redis.Redis.from_url(url).pubsub()
        self.sub.subscribe("bench-redis-py")
        self.sub.get_message(timeout=5)  # the subscribe confirmation
        self._stop = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop:
            msg = self.sub.get_message(timeout=0.5)
            if msg is not None and msg["type"] == "message":
                msgspec.msgpack.decode(msg["data"])
                self.arrived()

    def publish(self, i: int) -> None:
        self.pub.publish("bench-redis-py", msgspec.msgpack.encode({"i": i, "text": "hello"}))

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sub.close()
        self.pub.close()


class SocketIORoad(Road):
    name = "python-socketio RedisManager emit"

    def __init__(self, url: str) -> None:
        super().__init__()
        import socketio

        road = self

        class Timed(socketio.RedisManager):  # type: ignore[misc]
            def _handle_emit(self, message: Any) -> None:
                road.arrived()

        self.server = socketio.Server(async_mode="threading",
                                      client_manager=Timed(url, channel="bench-sio"))
        self.server.manager.initialize()
        self.pub = socketio.RedisManager(url, channel="bench-sio", write_only=True)
        # Wait until the listener is subscribed: emit until one arrives.
        deadline = time.monotonic() + 10
        while self.count == 0:
            self.pub.emit("said", {"i": -1}, namespace="/")
            time.sleep(0.05)
            if time.monotonic() > deadline:
                raise RuntimeError("the RedisManager listener never subscribed")
        time.sleep(0.2)
        with self.cond:
            self.count = 0

    def publish(self, i: int) -> None:
        self.pub.emit("said", {"i": i, "text": "hello"}, namespace="/")


def _latency(road: Road, n: int) -> list[float]:
    out = []
    for i in range(n):
        want = road.count + 1
        t0 = time.perf_counter()
        road.publish(i)
        road.wait(want)
        out.append(time.perf_counter() - t0)
    return out


def _throughput(road: Road, n: int) -> tuple[float, int]:
    """Delivered publications per second, and how many were refused (told, not sent)."""
    start, refused0 = road.count, road.refused()
    t0 = time.perf_counter()
    for i in range(n):
        road.publish(i)
    time.sleep(0.05)  # the hub thread has handed the last ones to the bridge
    refused = road.refused() - refused0
    road.wait(start + n - refused)
    return (n - refused) / (time.perf_counter() - t0 - 0.05), refused


def _pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q / 100 * len(ys)))] * 1000


def main() -> None:
    makers: list[tuple[str, Callable[[str], Road]]] = [
        ("bridge", BridgeRoad), ("redis_py", RedisPyRoad), ("socketio_redis", SocketIORoad)]
    figures: dict[str, dict[str, list[float]]] = {
        key: {"p50_ms": [], "p99_ms": [], "per_s": [], "refused": []} for key, _ in makers}
    names = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(tmp).start()
        try:
            for _ in range(ROUNDS):
                for key, make in makers:  # alternating, same Redis
                    road = make(server.url)
                    names[key] = road.name
                    try:
                        _latency(road, min(200, N))  # warm-up
                        lat = _latency(road, N)
                        figures[key]["p50_ms"].append(_pct(lat, 50))
                        figures[key]["p99_ms"].append(_pct(lat, 99))
                        rate, refused = _throughput(road, BURST)
                        figures[key]["per_s"].append(rate)
                        figures[key]["refused"].append(refused)
                    finally:
                        road.close()
        finally:
            server.stop()
    res: dict[str, Any] = {"n": N, "burst": BURST, "rounds": ROUNDS, "roads": {}}
    for key, fig in figures.items():
        med = {k: round(statistics.median(v), 3) for k, v in fig.items()}
        res["roads"][key] = {"name": names[key], **med, "rounds": fig}
    base = res["roads"]["redis_py"]
    print(f"cross-instance publish, median of {ROUNDS} rounds ({N} one at a time, {BURST} burst)")
    for key in ("bridge", "redis_py", "socketio_redis"):
        r = res["roads"][key]
        print(f"  {r['name']:<36} p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
              f"{r['per_s']:9.0f} /s ({r['refused']:.0f} refused)   (redis-py: p50 {base['p50_ms']:.3f} ms, "
              f"{base['per_s']:.0f} /s)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bridge.json"
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(res, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
