"""Spread benchmark: how evenly requests reach the workers, and the tail latency it buys.

    .venv/bin/python bench/spread.py        (also run by `make bench`)

Four workers of bench/spread_app.py (a handler that burns a fixed 2 ms of CPU and answers
with its pid), for the sync and gthread worker classes, under plain Gunicorn
(bench/spread_plain_conf.py) and with gunicorn-ext (bench/spread_ext_conf.py); and Node.js
``cluster`` with round-robin scheduling (bench/node_spread.js, the same handler shape)
where node is installed. For each, an open-loop load (bench/_openloop.py: a fixed request
rate, latency from each request's due time) at 30%, 60% and 85% of the capacity measured
closed-loop on plain Gunicorn of the same worker class, with new connections and with
kept-alive ones. Reported per run: each worker's share of the requests (max/min),
latency p50/p99/p99.9, errors. The servers are alternated within each level.

Environment: BENCH_SPREAD_SECONDS (6) per run, BENCH_SPREAD_LEVELS ("30,60,85"),
BENCH_SPREAD_CLASSES ("sync,gthread"). Writes bench/results/spread.json and spread.svg.
Loopback only; every run is bounded in requests and time; servers are always stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
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
WORKERS = 4
LABELS = {"plain": "plain Gunicorn", "ext": "gunicorn-ext", "node": "Node cluster (RR)"}


def log(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def gunicorn_server(kind: str, worker_class: str, log_dir: Path) -> Iterator[int]:
    conf = BENCH / f"spread_{kind}_conf.py"
    with running_gunicorn("spread_app:app", config=str(conf), cwd=str(BENCH), workers=WORKERS,
                          env={"SPREAD_WORKER_CLASS": worker_class}, log_dir=str(log_dir),
                          health_path="/", name=f"spread-{kind}-{worker_class}",
                          ready_timeout=60.0) as g:
        g.wait_workers(WORKERS)
        time.sleep(0.5)  # let every worker reach accept()
        yield g.port


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
        with gunicorn_server(kind, worker_class, log_dir) as port:
            yield port


def one_run(port: int, rate: float, keepalive: bool) -> dict[str, Any]:
    res = _openloop.run("127.0.0.1", port, rate, SECONDS, keepalive)
    return res.summary()


def measure(worker_class: str, node: str | None, log_dir: Path) -> dict[str, Any]:
    with server("plain", worker_class, None, log_dir) as port:
        _openloop.capacity("127.0.0.1", port, seconds=1.0)  # warm-up
        cap = _openloop.capacity("127.0.0.1", port, seconds=4.0, connections=16)
    log(f"[{worker_class}] capacity of plain Gunicorn: {cap:.0f} req/s (closed loop, 16 connections)")
    kinds = ["plain", "ext"] + (["node"] if node else [])
    out: dict[str, Any] = {"capacity_rps": cap, "levels": {}}
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
    try:
        for worker_class in CLASSES:
            results["classes"][worker_class] = measure(worker_class, node, log_dir)
    except Exception:
        traceback.print_exc()
        print(f"bench/spread.py: crashed; server logs kept in {log_dir}", file=sys.stderr)
        return 1
    targets = []
    for worker_class, data in results["classes"].items():
        for level, ld in data["levels"].items():
            for mode in ("new", "keepalive"):
                ext, plain = ld["runs"][f"ext/{mode}"], ld["runs"][f"plain/{mode}"]
                ratio = (ext["p99_ms"] / plain["p99_ms"]) if ext["p99_ms"] and plain["p99_ms"] else None
                targets.append({"class": worker_class, "level": int(level), "mode": mode,
                                "ext_max_min_share": ext["max_min_share"],
                                "plain_max_min_share": plain["max_min_share"],
                                "ext_p99_vs_plain": ratio})
    results["targets"] = targets
    log("\nTargets (max/min share <= 1.15 at every level; p99 <= 0.7x plain at 60% and 85%):")
    for t in targets:
        share = t["ext_max_min_share"]
        ratio = t["ext_p99_vs_plain"]
        log(f"  {t['class']:7s} {t['level']:3d}% {t['mode']:9s} share {share if share is None else round(share, 2)!s:>5} "
            f"(plain {t['plain_max_min_share'] if t['plain_max_min_share'] is None else round(t['plain_max_min_share'], 2)})"
            f"  p99 vs plain {ratio if ratio is None else round(ratio, 2)}")
    (RESULTS / "spread.json").write_text(json.dumps(results, indent=2) + "\n")
    write_plot(results)
    log(f"bench/spread.py: results in {RESULTS / 'spread.json'} and spread.svg")
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
