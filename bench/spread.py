"""Spread benchmark: how evenly requests reach the workers, and the tail latency it buys.

    .venv/bin/python bench/spread.py        (also run by `make bench`)

Four workers of bench/spread_app.py (a handler that burns a fixed 2 ms of CPU and answers
with its pid), for the sync and gthread worker classes, under plain Gunicorn
(bench/spread_plain_conf.py) and with gunicorn-ext (bench/spread_ext_conf.py); and Node.js
``cluster`` with round-robin scheduling (bench/node_spread.js, the same handler shape)
where node is installed. For each, an open-loop load (bench/_openloop.py: a fixed request
rate, latency from each request's due time) at 30%, 60% and 85% of the capacity measured
closed-loop on plain Gunicorn of the same worker class, with new connections and with
kept-alive ones. Reported per run: each worker's share of the requests (max/min; a worker
that served nothing counts as 1, so the share is then the busiest worker's count),
latency p50/p99/p99.9, errors, and the connections the client opened. The servers are
alternated within each level.

Kept-alive rows: the client reuses its idle connections (the most recently idle first, as
a client's pool does) and opens one only when none is idle. A kept-alive connection stays
with the worker that got it; gunicorn-ext's gthread workers close some of theirs (a
``Connection: close`` response when a worker's recent load is clearly above the mean),
and "connections/request" shows what that costs in reconnects beside plain and Node. A
sync worker closes every connection after its response (Gunicorn's sync worker has no
keep-alive), so its kept-alive rows are new-connection rows (connections/request 1.0).

Saturation: the closed-loop throughput of gunicorn-ext beside plain Gunicorn's (measured
plain, ext, ext with even_spread=False, plain; ratios against the mean of the two plain
figures), kept-alive and with a new connection per request, and the servers' CPU time per
request, the steadier figure on a shared machine (the last against ext without even
spread tells the dispatch hop's own cost from the rest of gunicorn-ext's).

The whole measurement is repeated BENCH_SPREAD_ROUNDS times (3); the targets are printed
as the median and range over the rounds, and the plot shows the medians.

Environment: BENCH_SPREAD_SECONDS (6) per run, BENCH_SPREAD_LEVELS ("30,60,85"),
BENCH_SPREAD_CLASSES ("sync,gthread"), BENCH_SPREAD_ROUNDS (3). Writes
bench/results/spread.json and spread.svg.
Loopback only; every run is bounded in requests and time; servers are always stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

import _openloop  # noqa: E402
from harness import free_port, running_gunicorn, wait_for  # noqa: E402
from plot import Bar, Panel, write_svg  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SPREAD_SECONDS", "6"))
LEVELS = [int(x) for x in os.environ.get("BENCH_SPREAD_LEVELS", "30,60,85").split(",")]
CLASSES = os.environ.get("BENCH_SPREAD_CLASSES", "sync,gthread").split(",")
ROUNDS = int(os.environ.get("BENCH_SPREAD_ROUNDS", "3"))
WORKERS = 4
LABELS = {"plain": "plain Gunicorn", "ext": "gunicorn-ext", "node": "Node cluster (RR)"}


def log(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def gunicorn_server(kind: str, worker_class: str, log_dir: Path,
                    even_spread: str = "") -> Iterator[Any]:
    """A running server of *kind*; yields its harness handle (``.port``, ``.master_pid``).
    *even_spread* "0"/"1" overrides gunicorn-ext's default."""
    conf = BENCH / f"spread_{kind}_conf.py"
    env = {"SPREAD_WORKER_CLASS": worker_class, "SPREAD_EVEN_SPREAD": even_spread}
    with running_gunicorn("spread_app:app", config=str(conf), cwd=str(BENCH), workers=WORKERS,
                          env=env, log_dir=str(log_dir),
                          health_path="/", name=f"spread-{kind}-{worker_class}",
                          ready_timeout=60.0) as g:
        g.wait_workers(WORKERS)
        time.sleep(0.5)  # let every worker reach accept()
        yield g


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes *pids* have used so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@contextlib.contextmanager
def node_server(node: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([node, str(BENCH / "node_spread.js"), str(port), str(WORKERS)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"node_spread.js did not start: {line!r}")
        wait_for(lambda: _serves(port), 10, what="node cluster serving")
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=5)


def _serves(port: int) -> bool:
    try:
        return _openloop.capacity("127.0.0.1", port, seconds=0.2, connections=1) > 0
    except OSError:
        return False


@contextlib.contextmanager
def server(kind: str, worker_class: str, node: str | None, log_dir: Path) -> Iterator[int]:
    if kind == "node":
        assert node is not None
        with node_server(node) as port:
            yield port
    else:
        with gunicorn_server(kind, worker_class, log_dir) as g:
            yield g.port


def one_run(port: int, rate: float, keepalive: bool) -> dict[str, Any]:
    res = _openloop.run("127.0.0.1", port, rate, SECONDS, keepalive)
    return res.summary(workers=WORKERS)


def saturation(kind: str, worker_class: str, log_dir: Path,
               even_spread: str = "") -> dict[str, dict[str, float]]:
    """Closed-loop throughput (req/s, 16 busy clients), kept-alive and with a new
    connection per request (each of those takes the primary's hop), and the server's CPU
    time per request (arbiter and workers): on a shared machine the CPU per request is the
    steadier figure of what saturation costs."""
    out: dict[str, dict[str, float]] = {}
    with gunicorn_server(kind, worker_class, log_dir, even_spread) as g:
        _openloop.capacity("127.0.0.1", g.port, seconds=1.0)  # warm-up
        pids = [g.master_pid, *g.worker_pids()]
        for mode in ("keepalive", "new"):
            before = cpu_seconds(pids)
            rps = _openloop.capacity("127.0.0.1", g.port, seconds=4.0, connections=16,
                                     keepalive=(mode == "keepalive"))
            cpu = cpu_seconds(pids) - before
            out[mode] = {"rps": rps, "cpu_ms_per_request": 1000.0 * cpu / max(1.0, rps * 4.0)}
    return out


def measure(worker_class: str, node: str | None, log_dir: Path) -> dict[str, Any]:
    plain_a = saturation("plain", worker_class, log_dir)
    ext_sat = saturation("ext", worker_class, log_dir)
    off_sat = saturation("ext", worker_class, log_dir, even_spread="0")
    plain_b = saturation("plain", worker_class, log_dir)
    sat: dict[str, Any] = {}
    for mode in ("keepalive", "new"):
        plain = (plain_a[mode]["rps"] + plain_b[mode]["rps"]) / 2
        plain_cpu = (plain_a[mode]["cpu_ms_per_request"] + plain_b[mode]["cpu_ms_per_request"]) / 2
        ext, off = ext_sat[mode], off_sat[mode]
        sat[mode] = {"plain": [plain_a[mode], plain_b[mode]], "ext": ext, "ext_no_spread": off,
                     "ext_vs_plain": ext["rps"] / plain,
                     "ext_cpu_vs_plain": ext["cpu_ms_per_request"] / plain_cpu,
                     "ext_cpu_vs_no_spread": ext["cpu_ms_per_request"] / off["cpu_ms_per_request"]}
        log(f"[{worker_class}] saturation ({mode}, closed loop, 16 connections): plain Gunicorn "
            f"{plain_a[mode]['rps']:.0f} and {plain_b[mode]['rps']:.0f} req/s, gunicorn-ext "
            f"{ext['rps']:.0f} req/s ({sat[mode]['ext_vs_plain']:.1%} of plain); CPU per request "
            f"plain {plain_cpu:.2f} ms, ext {ext['cpu_ms_per_request']:.2f} ms "
            f"({sat[mode]['ext_cpu_vs_plain']:.2f}x), ext with even_spread=False "
            f"{off['cpu_ms_per_request']:.2f} ms")
    cap = (plain_a["keepalive"]["rps"] + plain_b["keepalive"]["rps"]) / 2
    kinds = ["plain", "ext"] + (["node"] if node else [])
    out: dict[str, Any] = {"capacity_rps": cap, "saturation": sat,
                           "loadavg_at_start": list(os.getloadavg()), "levels": {}}
    for level in LEVELS:
        rate = cap * level / 100.0
        runs: dict[str, dict[str, Any]] = {}
        # Alternate the servers: plain, ext, node, then the other connection mode reversed.
        for mode, order in (("new", kinds), ("keepalive", list(reversed(kinds)))):
            for kind in order:
                with server(kind, worker_class, node, log_dir) as port:
                    summary = one_run(port, rate, keepalive=(mode == "keepalive"))
                runs[f"{kind}/{mode}"] = summary
                share = summary["max_min_share"]
                log(f"[{worker_class} {level}% = {rate:.0f} req/s {mode:9s}] {LABELS[kind]:18s} "
                    f"max/min share {share if share is None else round(share, 2)!s:>5}  "
                    f"p50 {summary['p50_ms'] or 0:6.1f} ms  p99 {summary['p99_ms'] or 0:7.1f} ms  "
                    f"p99.9 {summary['p999_ms'] or 0:7.1f} ms  errors {sum(summary['errors'].values())}  "
                    f"connections {summary['connections_opened']}  "
                    f"per worker {sorted(summary['per_worker'].values(), reverse=True)}")
        out["levels"][str(level)] = {"rate": rate, "runs": runs}
    return out


def write_plot(results: dict[str, Any]) -> None:
    panels = []
    for worker_class, data in results["classes"].items():
        for metric, unit in (("max_min_share", "max/min"), ("p99_ms", "ms")):
            groups = []
            for level, ld in data["levels"].items():
                bars = [Bar(LABELS[key.split("/")[0]] + f" ({key.split('/')[1]})",
                            run[metric], ours=key.startswith("ext/"))
                        for key, run in ld["runs"].items()]
                groups.append((f"{level}%", bars))
            panels.append(Panel(f"{worker_class}: {'worker share' if metric == 'max_min_share' else 'p99'}",
                                unit, groups))
    write_svg(RESULTS / "spread.svg", "Spread over 4 workers, open-loop load (2 ms handler)",
              panels, panel_width=420.0)


METRICS = ("max_min_share", "p50_ms", "p99_ms", "p999_ms", "connections_opened")


def _median(xs: list[float | None]) -> float | None:
    vals = sorted(x for x in xs if x is not None)
    return statistics.median(vals) if vals else None


def _spread(xs: list[float | None]) -> dict[str, float | None]:
    vals = [x for x in xs if x is not None]
    return {"median": _median(vals), "min": min(vals) if vals else None,
            "max": max(vals) if vals else None, "rounds": xs}


def _mr(d: dict[str, Any], digits: int = 2) -> str:
    if d["median"] is None:
        return "-"
    return f"{d['median']:.{digits}f} [{d['min']:.{digits}f}-{d['max']:.{digits}f}]"


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class, level and run: the median of each metric over the rounds."""
    out: dict[str, Any] = {}
    for c in rounds[0]:
        levels: dict[str, Any] = {}
        for level, ld in rounds[0][c]["levels"].items():
            runs = {key: {m: _median([r[c]["levels"][level]["runs"][key][m] for r in rounds])
                          for m in METRICS}
                    for key in ld["runs"]}
            levels[level] = {"rate": _median([r[c]["levels"][level]["rate"] for r in rounds]),
                             "runs": runs}
        out[c] = {"capacity_rps": _median([r[c]["capacity_rps"] for r in rounds]),
                  "levels": levels}
    return out


def targets(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each a median and range over the rounds (ratios per round)."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    out: list[dict[str, Any]] = []
    for c in rounds[0]:
        for mode in ("keepalive", "new"):
            out.append({"class": c, "mode": mode, "saturation": _spread(
                [r[c]["saturation"][mode]["ext_vs_plain"] for r in rounds]),
                "cpu_per_request": _spread(
                [r[c]["saturation"][mode]["ext_cpu_vs_plain"] for r in rounds]),
                "cpu_per_request_vs_no_spread": _spread(
                [r[c]["saturation"][mode].get("ext_cpu_vs_no_spread") for r in rounds])})
        for level in rounds[0][c]["levels"]:
            for mode in ("new", "keepalive"):
                def runs(kind: str, c: str = c, level: str = level, mode: str = mode) -> list[Any]:
                    return [r[c]["levels"][level]["runs"].get(f"{kind}/{mode}") for r in rounds]
                plain, ext, node = runs("plain"), runs("ext"), runs("node")
                out.append({
                    "class": c, "level": int(level), "mode": mode,
                    "ext_max_min_share": _spread([x["max_min_share"] for x in ext]),
                    "plain_max_min_share": _spread([x["max_min_share"] for x in plain]),
                    "node_max_min_share": _spread([x and x["max_min_share"] for x in node]),
                    "ext_p99_vs_plain": _spread([ratio(x["p99_ms"], p["p99_ms"])
                                                 for x, p in zip(ext, plain, strict=True)]),
                    "node_p99_vs_plain": _spread([ratio(x and x["p99_ms"], p["p99_ms"])
                                                  for x, p in zip(node, plain, strict=True)]),
                    # Connections the client opened per request: 1 with a new connection
                    # per request; kept alive, what the server's closes cost in reconnects.
                    "connections_per_request": {
                        kind: _spread([x and x["connections_opened"] / max(1, x["ok"])
                                       for x in runs(kind)])
                        for kind in ("plain", "ext", "node")},
                })
    return out


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    node = shutil.which("node")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-spread-"))
    import gunicorn

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "gunicorn": gunicorn.__version__, "node": node is not None,
                    "loadavg_at_start": list(os.getloadavg())},
        "seconds_per_run": SECONDS, "workers": WORKERS, "classes": {},
    }
    results["rounds"] = []
    results["rounds_machine"] = []
    try:
        for n in range(ROUNDS):
            start = os.getloadavg()[0]
            log(f"--- round {n + 1} of {ROUNDS} (load average {start:.1f})")
            results["rounds"].append({c: measure(c, node, log_dir) for c in CLASSES})
            results["rounds_machine"].append(
                {"loadavg": [round(start, 2), round(os.getloadavg()[0], 2)]})
    except Exception:
        traceback.print_exc()
        print(f"bench/spread.py: crashed; server logs kept in {log_dir}", file=sys.stderr)
        return 1
    results["classes"] = medians(results["rounds"])
    results["targets"] = targets(results["rounds"])
    log(f"\nTargets, median [range] over {ROUNDS} rounds (max/min share <= 1.15 at every level; "
        "p99 <= 0.7x plain at 60% and 85%; saturation >= 97% of plain):")
    for t in results["targets"]:
        if "saturation" in t:
            log(f"  {t['class']:7s} saturation {t['mode']:9s} req/s ext/plain {_mr(t['saturation'], 3)}"
                f"  CPU per request ext/plain {_mr(t['cpu_per_request'], 3)}, "
                f"ext/ext without even spread {_mr(t['cpu_per_request_vs_no_spread'], 3)}")
            continue
        cpr = t["connections_per_request"]
        log(f"  {t['class']:7s} {t['level']:3d}% {t['mode']:9s} share ext {_mr(t['ext_max_min_share'])} "
            f"plain {_mr(t['plain_max_min_share'])} node {_mr(t['node_max_min_share'])}  "
            f"p99 ext/plain {_mr(t['ext_p99_vs_plain'])} node/plain {_mr(t['node_p99_vs_plain'])}  "
            f"connections/request ext {_mr(cpr['ext'], 3)} plain {_mr(cpr['plain'], 3)} "
            f"node {_mr(cpr['node'], 3)}")
    loads = [r["loadavg"] for r in results["rounds_machine"]]
    log(f"Load average (1 min) at each round's start and end: {loads} on {os.cpu_count()} CPUs; "
        "p99 figures are not meaningful while it is above the CPU count (other processes "
        "take the CPUs the servers and the load generator need).")
    (RESULTS / "spread.json").write_text(json.dumps(results, indent=2) + "\n")
    write_plot(results)
    log(f"bench/spread.py: results in {RESULTS / 'spread.json'} and spread.svg")
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
