"""IPC benchmark: the gunicorn-ext bus against its floor and its baselines.

    .venv/bin/python bench/ipc.py          (also run by `make bench`)

One run measures, each figure beside its baseline:

1. worker->primary request/reply round trip (p50/p99) through a real Gunicorn
   (bench/ipc_conf.py + bench/ipc_app.py, ``GET /rtt``, measured inside the worker),
   and the async API's (``await worker.arequest``) in a ``-k asgi`` worker
   (bench/ipc_asgi_app.py) beside it;
2. worker->primary one-way throughput (``GET /oneway``), sync and async;
3. the floor: a raw socketpair ping-pong between two forked processes with a
   4-byte length prefix and msgspec msgpack frames of the same shape;
4. ``multiprocessing.Pipe`` ping-pong round trip (and one-way throughput);
5. Node.js ``cluster`` ``process.send`` one-way throughput and round trip
   (bench/node_cluster.js; null when ``node`` is not on PATH);
Hello-world req/s beside plain Gunicorn, per worker class, is bench/hello.py's.

The machine is small and noisy, so the bus and its baselines are measured in
alternating rounds and the medians reported. Writes bench/results/ipc.json and
a plot (bench/results/ipc.svg; ipc.png too when matplotlib is importable).
Targets print as PASS/FAIL; a miss does not fail the run, a crash does.

The run also measures how much CPU other processes took meanwhile and warns when
the figures are unreliable. Sizes can be overridden for quick checks:
BENCH_RTT_N, BENCH_ONEWAY_N, BENCH_ROUNDS.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

from harness import Gunicorn, running_gunicorn  # noqa: E402
from plot import Bar, Panel, write_svg  # noqa: E402

# ---------------------------------------------------------------- parameters

RTT_N = int(os.environ.get("BENCH_RTT_N", "20000"))
ONEWAY_N = int(os.environ.get("BENCH_ONEWAY_N", "300000"))
#: multiprocessing.Pipe (pickle) is slow; fewer messages keep its rounds short.
PIPE_ONEWAY_N = max(ONEWAY_N // 3, 1)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
#: Hard bound on any one child process measurement.
CHILD_TIMEOUT = 60.0

TARGET_RTT_VS_FLOOR = 1.3  # bus p50 <= 1.3x floor p50
TARGET_ONEWAY_VS_NODE = 2.0  # bus msgs/s >= 2x node
TARGET_ASYNC_RTT_VS_SYNC = 1.5  # async bus p50 <= 1.5x the sync bus p50
ASGI_CLASSES = ("asgi", "uvicorn_worker.UvicornWorker")


def log(msg: str) -> None:
    print(msg, flush=True)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ------------------------------------------------- floor: socketpair + msgspec

HEADER = struct.Struct(">I")


class FReq(msgspec.Struct, array_like=True, tag="q"):
    """Same shape as gunicorn_ext.ipc.frames.Req."""

    id: int
    name: str
    dst: int
    src: int
    payload: Any = None


class FRep(msgspec.Struct, array_like=True, tag="r"):
    """Same shape as gunicorn_ext.ipc.frames.Rep."""

    id: int
    payload: Any = None


class _Frames:
    """Minimal length-prefixed stream splitter (what any real protocol needs)."""

    def __init__(self, sock: socket.socket, decoder: msgspec.msgpack.Decoder) -> None:
        self.sock = sock
        self.dec = decoder
        self.buf = bytearray()

    def read(self) -> Any | None:
        buf = self.buf
        while True:
            if len(buf) >= 4:
                (size,) = HEADER.unpack_from(buf, 0)
                if len(buf) - 4 >= size:
                    obj = self.dec.decode(memoryview(buf)[4:4 + size])
                    del buf[:4 + size]
                    return obj
            data = self.sock.recv(65536)
            if not data:
                return None
            buf += data


def _floor_server(sock: socket.socket) -> None:
    """Answer FReq "ping" with FRep, count one-way FReq "count", answer "total"."""
    sock.settimeout(CHILD_TIMEOUT)
    enc = msgspec.msgpack.Encoder()
    frames = _Frames(sock, msgspec.msgpack.Decoder(FReq))
    count = 0
    while True:
        req = frames.read()
        if req is None:
            return
        if req.name == "count":
            count += 1
            continue
        if req.name == "total":
            value: Any = count
            count = 0
        else:
            value = req.payload
        body = enc.encode(FRep(req.id, value))
        sock.sendall(HEADER.pack(len(body)) + body)


def _floor_client(sock: socket.socket, n_rtt: int, n_oneway: int) -> dict[str, Any]:
    sock.settimeout(CHILD_TIMEOUT)
    enc = msgspec.msgpack.Encoder()
    frames = _Frames(sock, msgspec.msgpack.Decoder(FRep))
    ids = iter(range(1, 1 << 62))

    def request(name: str, payload: Any) -> Any:
        body = enc.encode(FReq(next(ids), name, -1, 0, payload))
        sock.sendall(HEADER.pack(len(body)) + body)
        rep = frames.read()
        assert rep is not None
        return rep.payload

    def send(i: int) -> None:
        body = enc.encode(FReq(next(ids), "count", -1, 0, i))
        sock.sendall(HEADER.pack(len(body)) + body)

    return _measure(request, send, n_rtt, n_oneway)


def _measure(request: Callable[[str, Any], Any], send: Callable[[int], None], n_rtt: int,
             n_oneway: int) -> dict[str, Any]:
    """The same round-trip and one-way loops for every baseline transport."""
    out: dict[str, Any] = {}
    if n_rtt:
        for i in range(min(n_rtt // 10, 2000)):
            request("ping", i)
        lat = []
        clock = time.perf_counter_ns
        for i in range(n_rtt):
            t0 = clock()
            request("ping", i)
            lat.append(clock() - t0)
        out.update(_pcts(lat))
    if n_oneway:
        request("total", None)
        start = time.perf_counter()
        for i in range(n_oneway):
            send(i)
        got = request("total", None)
        elapsed = time.perf_counter() - start
        assert got == n_oneway, (got, n_oneway)
        out["msgs_per_s"] = n_oneway / elapsed
    return out


def _pcts(lat_ns: list[int]) -> dict[str, float]:
    lat_ns.sort()
    n = len(lat_ns)
    return {"p50_us": lat_ns[n // 2] / 1000, "p99_us": lat_ns[int(n * 0.99)] / 1000, "n": n}


# ------------------------------------------------------ multiprocessing.Pipe


def _pipe_server(conn: Any) -> None:
    count = 0
    while conn.poll(CHILD_TIMEOUT):
        try:
            msg = conn.recv()
        except EOFError:
            return
        kind = msg[1]
        if kind == "count":
            count += 1
        elif kind == "total":
            conn.send((msg[0], count))
            count = 0
        else:
            conn.send((msg[0], msg[4]))


def _pipe_client(conn: Any, n_rtt: int, n_oneway: int) -> dict[str, Any]:
    ids = iter(range(1, 1 << 62))

    def request(name: str, payload: Any) -> Any:
        conn.send((next(ids), name, -1, 0, payload))
        if not conn.poll(CHILD_TIMEOUT):
            raise TimeoutError("pipe server did not answer")
        return conn.recv()[1]

    def send(i: int) -> None:
        conn.send((next(ids), "count", -1, 0, i))

    return _measure(request, send, n_rtt, n_oneway)


# ---------------------------------------------- running a pair of forked children


def _child_main(role: Callable[..., Any], own: Any, other: Any, args: tuple[Any, ...],
                result_w: Any) -> None:
    other.close()  # so each side sees EOF when its peer exits
    try:
        value = role(own, *args)
        if result_w is not None:
            result_w.send(("ok", value))
    except BaseException as exc:  # report, never hang the parent
        if result_w is not None:
            result_w.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


def _run_pair(a: Any, b: Any, server: Callable[..., Any], client: Callable[..., Any],
              client_args: tuple[Any, ...]) -> dict[str, Any]:
    """Fork a server on end ``a`` and a client on end ``b``; return the client's result.

    Bounded in time: a child still alive after its deadline is killed.
    """
    ctx = mp.get_context("fork")
    res_r, res_w = ctx.Pipe(duplex=False)
    procs = [
        ctx.Process(target=_child_main, args=(server, a, b, (), None), daemon=True),
        ctx.Process(target=_child_main, args=(client, b, a, client_args, res_w), daemon=True),
    ]
    try:
        for p in procs:
            p.start()
        a.close()
        b.close()
        res_w.close()
        if not res_r.poll(CHILD_TIMEOUT):
            raise TimeoutError(f"{client.__name__} gave no result within {CHILD_TIMEOUT}s")
        status, value = res_r.recv()
        if status != "ok":
            raise RuntimeError(f"{client.__name__} failed: {value}")
        return value  # type: ignore[no-any-return]
    finally:
        a.close()
        b.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        res_r.close()


def floor_run(n_rtt: int, n_oneway: int) -> dict[str, Any]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):  # the buffer sizes the bus uses (gunicorn_ext/ipc/hub.py)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return _run_pair(a, b, _floor_server, _floor_client, (n_rtt, n_oneway))


def pipe_run(n_rtt: int, n_oneway: int) -> dict[str, Any]:
    a, b = mp.get_context("fork").Pipe(duplex=True)
    return _run_pair(a, b, _pipe_server, _pipe_client, (n_rtt, n_oneway))


# ------------------------------------------------------------------- node


def node_run(node: str, n_oneway: int, n_rtt: int) -> dict[str, Any]:
    """Run bench/node_cluster.js once in its own process group (killed on timeout)."""
    proc = subprocess.Popen(
        [node, str(BENCH / "node_cluster.js"), str(n_oneway), str(n_rtt)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, cwd=BENCH,
    )
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        out, err = b"", b"timed out"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"node_cluster.js failed (rc={proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


# -------------------------------------------------------------- load generator


_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def _py_load_worker(host: str, port: int, seconds: float, max_requests: int, out: Any) -> None:
    ok = bad = 0
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    while ok + bad < max_requests and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(_REQUEST)
                chunks = []
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
            if b"".join(chunks).startswith(b"HTTP/1.1 200"):
                ok += 1
            else:
                bad += 1
        except OSError:
            bad += 1
    out.send((ok, bad, time.monotonic() - t0))


# ----------------------------------------------------------------- measurements


@contextlib.contextmanager
def _server(app: str, config: str, log_dir: Path, name: str,
            env: dict[str, str] | None = None) -> Iterator[Gunicorn]:
    with running_gunicorn(app, config=str(BENCH / config), cwd=str(BENCH), log_dir=str(log_dir),
                          health_path="/", name=name, ready_timeout=30.0, env=env) as g:
        yield g


def bus_rtt(g: Gunicorn, n: int) -> dict[str, Any]:
    resp = g.get(f"/rtt?n={n}", timeout=CHILD_TIMEOUT)
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def bus_oneway(g: Gunicorn, n: int) -> dict[str, Any]:
    resp = g.get(f"/oneway?n={n}", timeout=CHILD_TIMEOUT)
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def measure_ipc(log_dir: Path, node: str | None, errors: list[str]) -> dict[str, Any]:
    rounds: dict[str, list[Any]] = {k: [] for k in
                                    ("bus_rtt", "floor_rtt", "pipe_rtt", "bus_oneway",
                                     "floor_oneway", "pipe_oneway", "node", "abus_rtt",
                                     "abus_oneway")}
    with _server("ipc_app:app", "ipc_conf.py", log_dir, "ipc") as g, \
            _server("ipc_asgi_app:app", "ipc_conf.py", log_dir, "ipc-asgi",
                    {"WORKER_CLASS": "asgi"}) as ag:
        bus_rtt(g, 2000)  # warm the worker and the hub
        bus_rtt(ag, 2000)
        log(f"round trip, {ROUNDS} rounds of n={RTT_N} (bus / async bus / socketpair floor / "
            "Pipe, alternating)")
        for r in range(ROUNDS):
            order = [("bus_rtt", lambda: bus_rtt(g, RTT_N)),
                     ("abus_rtt", lambda: bus_rtt(ag, RTT_N)),
                     ("floor_rtt", lambda: floor_run(RTT_N, 0)),
                     ("pipe_rtt", lambda: pipe_run(RTT_N, 0))]
            if r % 2:
                order.reverse()
            for key, fn in order:
                res = fn()
                rounds[key].append(res)
            log(f"  round {r + 1}: bus p50 {rounds['bus_rtt'][-1]['p50_us']:.1f} us, "
                f"async bus p50 {rounds['abus_rtt'][-1]['p50_us']:.1f} us, "
                f"floor p50 {rounds['floor_rtt'][-1]['p50_us']:.1f} us, "
                f"pipe p50 {rounds['pipe_rtt'][-1]['p50_us']:.1f} us")
        log(f"one-way, {ROUNDS} rounds of n={ONEWAY_N} (bus / node / socketpair / Pipe, alternating)")
        for r in range(ROUNDS):
            order = [("bus_oneway", lambda: bus_oneway(g, ONEWAY_N)),
                     ("abus_oneway", lambda: bus_oneway(ag, ONEWAY_N)),
                     ("floor_oneway", lambda: floor_run(0, ONEWAY_N)),
                     ("pipe_oneway", lambda: pipe_run(0, PIPE_ONEWAY_N))]
            if node is not None:
                order.insert(1, ("node", lambda: node_run(node, ONEWAY_N, RTT_N)))
            if r % 2:
                order.reverse()
            for key, fn in order:
                try:
                    rounds[key].append(fn())
                except Exception as exc:
                    if key != "node":
                        raise
                    errors.append(f"node round {r + 1}: {exc}")
                    log(f"  node failed: {exc}")
            node_s = (f", node {rounds['node'][-1]['oneway_msgs_per_s']:,.0f}"
                      if rounds["node"] else "")
            log(f"  round {r + 1}: bus {rounds['bus_oneway'][-1]['msgs_per_s']:,.0f}, "
                f"async bus {rounds['abus_oneway'][-1]['msgs_per_s']:,.0f}{node_s}, "
                f"socketpair {rounds['floor_oneway'][-1]['msgs_per_s']:,.0f}, "
                f"pipe {rounds['pipe_oneway'][-1]['msgs_per_s']:,.0f} msgs/s")
        for srv in (g, ag):
            if "Traceback" in srv.log_text():
                errors.append("traceback in the ipc gunicorn log:\n" + srv.log_text_tail())
    return rounds


# --------------------------------------------------------------------- report


def machine_info(node: str | None, wrk: str | None) -> dict[str, Any]:
    import gunicorn

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node_version = None
    if node:
        with contextlib.suppress(Exception):
            node_version = subprocess.run([node, "--version"], capture_output=True, text=True,
                                          timeout=10).stdout.strip()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "gunicorn": gunicorn.__version__,
        "msgspec": msgspec.__version__,
        "node": node_version,
        "load_generator": "wrk" if wrk else "python",
        "loadavg_at_start": list(os.getloadavg()),
    }


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent non-idle over ``seconds`` (other processes' load)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / (t1 - t0) if t1 > t0 else None


class ForeignLoad:
    """CPU time used by processes other than this run's (its own tree is subtracted).

    /proc/stat's user+nice+system time over an interval, minus what this process and
    its reaped descendants (Gunicorn, node, wrk, forked pairs) used, as a fraction of
    all CPUs' time: above ~0.1 means somebody else was competing for the CPUs.
    ``steal`` is the hypervisor's share taken by other guests, on the same scale.
    """

    def __init__(self) -> None:
        self.t0 = self._sample()
        self.steal: float | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float, float] | None:
        try:
            fields = [int(x) for x in
                      Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        # irq/softirq time (loopback networking) is nobody's process time: left out.
        busy = sum(fields[:3]) / hz
        steal = fields[7] / hz if len(fields) > 7 else 0.0
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), busy, own, steal

    def fraction(self) -> float | None:
        t1 = self._sample()
        if self.t0 is None or t1 is None or t1[0] <= self.t0[0]:
            return None
        capacity = (t1[0] - self.t0[0]) * (os.cpu_count() or 1)
        self.steal = (t1[3] - self.t0[3]) / capacity
        foreign = (t1[1] - self.t0[1]) - (t1[2] - self.t0[2])
        return max(0.0, foreign / capacity)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v: float | None, unit: str, width: int = 10) -> str:
    if v is None:
        return f"{'n/a':>{width}} {unit}"
    if unit == "us":
        return f"{v:>{width},.1f} {unit}"
    return f"{v:>{width},.0f} {unit}"


def write_png(path: Path, res: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = [
        ("round trip p50 (us)", ["gunicorn-ext", "socketpair floor", "mp.Pipe", "node cluster"],
         [res["rtt_p50_us"], res["floor_rtt_p50_us"], res["pipe_rtt_p50_us"], res["node_rtt_p50_us"]]),
        ("one-way (msgs/s)", ["gunicorn-ext", "node cluster", "socketpair floor", "mp.Pipe"],
         [res["oneway_msgs_per_s"], res["node_oneway_msgs_per_s"], res["floor_oneway_msgs_per_s"],
          res["pipe_oneway_msgs_per_s"]]),
    ]
    for ax, (title, labels, values) in zip(axes, panels, strict=True):
        vals = [v if v is not None else 0 for v in values]
        colors = ["#d9534f"] + ["#5b7fa6"] * (len(vals) - 1)
        bars = ax.bar(labels, vals, color=colors)
        for b, v in zip(bars, values, strict=True):
            ax.annotate("n/a" if v is None else f"{v:,.1f}" if v < 1000 else f"{v:,.0f}",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    t_start = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    node = shutil.which("node")
    wrk = shutil.which("wrk")
    errors: list[str] = []
    log_dir = Path(tempfile.mkdtemp(prefix="bench-ipc-"))
    info = machine_info(node, wrk)
    busy = cpu_busy()
    info["cpu_busy_before_run"] = busy
    if busy is not None and busy > 0.2:
        log(f"WARNING: the machine is busy before the run ({busy:.0%} of all CPU time in use by "
            "other processes); the figures below are unreliable")
    log(f"machine: {info['cpu_count']} cpus ({info['cpu_model']}), python {info['python']}, "
        f"gunicorn {info['gunicorn']}, msgspec {info['msgspec']}, node {info['node'] or 'absent'}, "
        f"load generator {info['load_generator']}")
    foreign: dict[str, float | None] = {}
    steal: dict[str, float | None] = {}
    try:
        fl = ForeignLoad()
        ipc = measure_ipc(log_dir, node, errors)
        foreign["ipc"], steal["ipc"] = fl.fraction(), fl.steal
    except Exception:
        traceback.print_exc()
        print(f"bench/ipc.py: crashed; server logs kept in {log_dir}", file=sys.stderr)
        return 1

    def m(key: str, field: str) -> float | None:
        return median([r[field] for r in ipc[key] if field in r])

    res: dict[str, Any] = {
        "rtt_p50_us": m("bus_rtt", "p50_us"),
        "rtt_p99_us": m("bus_rtt", "p99_us"),
        "oneway_msgs_per_s": m("bus_oneway", "msgs_per_s"),
        "floor_rtt_p50_us": m("floor_rtt", "p50_us"),
        "floor_rtt_p99_us": m("floor_rtt", "p99_us"),
        "floor_oneway_msgs_per_s": m("floor_oneway", "msgs_per_s"),
        "pipe_rtt_p50_us": m("pipe_rtt", "p50_us"),
        "pipe_rtt_p99_us": m("pipe_rtt", "p99_us"),
        "pipe_oneway_msgs_per_s": m("pipe_oneway", "msgs_per_s"),
        "async_rtt_p50_us": m("abus_rtt", "p50_us"),
        "async_rtt_p99_us": m("abus_rtt", "p99_us"),
        "async_oneway_msgs_per_s": m("abus_oneway", "msgs_per_s"),
        "node_oneway_msgs_per_s": m("node", "oneway_msgs_per_s") if node else None,
        "node_rtt_p50_us": m("node", "rtt_p50_us") if node else None,
        "node_rtt_p99_us": m("node", "rtt_p99_us") if node else None,
    }
    res["ratios"] = {
        "async_rtt_p50_vs_sync": _ratio(res["async_rtt_p50_us"], res["rtt_p50_us"]),
        "async_rtt_p50_vs_floor": _ratio(res["async_rtt_p50_us"], res["floor_rtt_p50_us"]),
        "async_oneway_vs_sync": _ratio(res["async_oneway_msgs_per_s"], res["oneway_msgs_per_s"]),
        "rtt_p50_vs_floor": _ratio(res["rtt_p50_us"], res["floor_rtt_p50_us"]),
        "rtt_p99_vs_floor": _ratio(res["rtt_p99_us"], res["floor_rtt_p99_us"]),
        "rtt_p50_vs_pipe": _ratio(res["rtt_p50_us"], res["pipe_rtt_p50_us"]),
        "rtt_p50_vs_node": _ratio(res["rtt_p50_us"], res["node_rtt_p50_us"]),
        "oneway_vs_node": _ratio(res["oneway_msgs_per_s"], res["node_oneway_msgs_per_s"]),
        "oneway_vs_floor": _ratio(res["oneway_msgs_per_s"], res["floor_oneway_msgs_per_s"]),
        "oneway_vs_pipe": _ratio(res["oneway_msgs_per_s"], res["pipe_oneway_msgs_per_s"]),
        # Bus vs floor within each round (they ran back to back), for context: the
        # floor itself moves by +-30% between rounds on this kind of machine.
        "rtt_p50_vs_floor_per_round": [
            b["p50_us"] / f["p50_us"] for b, f in zip(ipc["bus_rtt"], ipc["floor_rtt"], strict=False)],
    }
    r = res["ratios"]
    targets = {
        "rtt_p50_within_1.3x_floor": None if r["rtt_p50_vs_floor"] is None
        else r["rtt_p50_vs_floor"] <= TARGET_RTT_VS_FLOOR,
        "oneway_at_least_2x_node": None if r["oneway_vs_node"] is None
        else r["oneway_vs_node"] >= TARGET_ONEWAY_VS_NODE,
        "async_rtt_p50_within_1.5x_sync": None if r["async_rtt_p50_vs_sync"] is None
        else r["async_rtt_p50_vs_sync"] <= TARGET_ASYNC_RTT_VS_SYNC,
    }

    # ---- print, each figure beside its baseline
    log("")
    log(f"== worker->primary request/reply round trip (median of {ROUNDS} rounds, n={RTT_N})")
    rows = [("gunicorn-ext bus", "rtt"), ("async bus (-k asgi)", "async_rtt"),
            ("socketpair+msgspec floor", "floor_rtt"),
            ("multiprocessing.Pipe", "pipe_rtt"), ("node cluster process.send", "node_rtt")]
    for label, k in rows:
        log(f"  {label:<28} p50 {_fmt(res[k + '_p50_us'], 'us')}   p99 {_fmt(res[k + '_p99_us'], 'us')}")
    log(f"  bus/floor: p50 {_x(r['rtt_p50_vs_floor'])} (per round: "
        f"{', '.join(_x(x) for x in r['rtt_p50_vs_floor_per_round'])}), p99 {_x(r['rtt_p99_vs_floor'])}; "
        f"bus/pipe p50 {_x(r['rtt_p50_vs_pipe'])}; bus/node p50 {_x(r['rtt_p50_vs_node'])}")
    log(f"  async/sync bus p50 {_x(r['async_rtt_p50_vs_sync'])}, async/floor p50 "
        f"{_x(r['async_rtt_p50_vs_floor'])}")
    log(f"== worker->primary one-way throughput (median of {ROUNDS} rounds, n={ONEWAY_N})")
    rows2 = [("gunicorn-ext bus", "oneway_msgs_per_s"),
             ("async bus (-k asgi)", "async_oneway_msgs_per_s"), ("node cluster process.send", "node_oneway_msgs_per_s"),
             ("socketpair+msgspec floor", "floor_oneway_msgs_per_s"),
             ("multiprocessing.Pipe", "pipe_oneway_msgs_per_s")]
    for label, k in rows2:
        log(f"  {label:<28} {_fmt(res[k], 'msgs/s')}")
    log(f"  bus/node {_x(r['oneway_vs_node'])}, bus/floor {_x(r['oneway_vs_floor'])}, "
        f"bus/pipe {_x(r['oneway_vs_pipe'])}, async/sync {_x(r['async_oneway_vs_sync'])}")
    log("")
    info["foreign_cpu_fraction"] = foreign
    info["steal_fraction"] = steal
    noisy = [k for k, v in foreign.items() if v is not None and v > 0.1]
    for k in noisy:
        log(f"WARNING: other processes used {foreign[k]:.0%} of the CPUs during the {k} "
            "measurements; those figures are unreliable (re-run on a quiet machine)")
    log(_verdict(targets["rtt_p50_within_1.3x_floor"],
                 f"RTT p50 <= {TARGET_RTT_VS_FLOOR}x floor: {_x(r['rtt_p50_vs_floor'])}"))
    log(_verdict(targets["oneway_at_least_2x_node"],
                 f"one-way >= {TARGET_ONEWAY_VS_NODE:g}x node: {_x(r['oneway_vs_node'])}"))
    log(_verdict(targets["async_rtt_p50_within_1.5x_sync"],
                 f"async RTT p50 <= {TARGET_ASYNC_RTT_VS_SYNC}x sync: {_x(r['async_rtt_p50_vs_sync'])}"))

    info["loadavg_at_end"] = list(os.getloadavg())
    res.update({
        "targets": targets,
        "machine": info,
        "params": {"rtt_n": RTT_N, "oneway_n": ONEWAY_N, "pipe_oneway_n": PIPE_ONEWAY_N, "rounds": ROUNDS},
        "rounds": ipc,
        "errors": errors,
        "seconds": round(time.monotonic() - t_start, 1),
    })
    out = RESULTS / "ipc.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)

    svg = write_svg(RESULTS / "ipc.svg", "gunicorn-ext IPC vs baselines", [
        Panel("round trip", "us (lower is better)", [
            ("p50", [Bar("gunicorn-ext", res["rtt_p50_us"], ours=True),
                     Bar("socketpair floor", res["floor_rtt_p50_us"]),
                     Bar("mp.Pipe", res["pipe_rtt_p50_us"]),
                     Bar("node cluster", res["node_rtt_p50_us"])]),
            ("p99", [Bar("gunicorn-ext", res["rtt_p99_us"], ours=True),
                     Bar("socketpair floor", res["floor_rtt_p99_us"]),
                     Bar("mp.Pipe", res["pipe_rtt_p99_us"]),
                     Bar("node cluster", res["node_rtt_p99_us"])]),
        ]),
        Panel("one-way throughput", "msgs/s (higher is better)", [
            ("", [Bar("gunicorn-ext", res["oneway_msgs_per_s"], ours=True),
                  Bar("node cluster", res["node_oneway_msgs_per_s"]),
                  Bar("socketpair floor", res["floor_oneway_msgs_per_s"]),
                  Bar("mp.Pipe", res["pipe_oneway_msgs_per_s"])]),
        ]),
    ], panel_width=340)
    plots = [svg]
    try:
        if write_png(RESULTS / "ipc.png", res):
            plots.append(str(RESULTS / "ipc.png"))
    except Exception as exc:  # a plotting problem must not lose the figures
        errors.append(f"png plot failed: {exc}")
    log(f"results: {out}; plots: {', '.join(os.path.relpath(p, ROOT) for p in plots)} "
        f"({res['seconds']:.0f}s)")
    if errors:
        for e in errors:
            print(f"bench/ipc.py: error: {e}", file=sys.stderr)
        print(f"bench/ipc.py: server logs kept in {log_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _verdict(ok: bool | None, text: str) -> str:
    return f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}: {text}"


if __name__ == "__main__":
    sys.exit(main())
