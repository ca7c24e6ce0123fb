"""A real Prometheus scraping the example's admin endpoint, and the shipped rules and dashboard.

Prometheus is Debian's ``prometheus`` package (``make system-deps`` installs it; it
brings ``promtool``), started here on a free port with a generated config: 1 s scrapes
of the example's ADMIN_BIND, with deploy/prometheus-rules.yml loaded. The test talks to
it only through its HTTP API, as Grafana would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, find_binary, free_port, tail, wait_for
from prometheus_client.parser import text_string_to_metric_families

from gunicorn_ext.metrics import ClusterMetrics, WorkerStats

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flask_app"
RULES = ROOT / "deploy" / "prometheus-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
JOB = "gunicorn-ext"

LOAD_RATE = 40.0  # requests per second the test sends, paced
LOAD_SECONDS = 10.0
RATE_WINDOW = 8  # seconds, the rate() range checked
MAX_LOAD_REQUESTS = 2000  # hard bound on every load loop below
#: A metric name of ours (not part of a recording rule's name, which has colons).
METRIC = re.compile(r"(?<![:\w])gunicorn_ext_\w+(?![:\w])")


def tool(name: str) -> str:
    path = find_binary(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (apt-get install prometheus)",
                    pytrace=False)
    return path


# -- what the project exports -----------------------------------------------------------


def exported_names() -> set[str]:
    """Every sample name the primary's document can hold, from a ClusterMetrics fed everything."""
    m = ClusterMetrics()
    stats = WorkerStats(registry=None)
    stats.request_started()
    stats.request_finished(0.01)
    m.update(0, 100, stats.snapshot())
    m.set_process(0, 100, 1 << 20, 5.0)
    m.set_restarts(0, 1)
    m.set_restart_state(0, 0.5, False)
    m.set_workers(2, 2)
    m.set_memory_limits(1 << 30, 2 << 30)
    return {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict) and "label_values(" in q.get("query", ""):
            m = re.fullmatch(r"label_values\((\w+), *\w+\)", q["query"])
            assert m, q
            exprs.append(m.group(1))
    return exprs


def concrete(expr: str, instance: str = ".+", rate_interval: str = "1m") -> str:
    """A dashboard expression with Grafana's variables filled in."""
    return expr.replace("$instance", instance).replace("$__rate_interval", rate_interval)


def test_rules_pass_promtool(tmp_path: Path) -> None:
    r = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout
    names = set(METRIC.findall(RULES.read_text()))
    assert names and names <= exported_names(), names - exported_names()

    # promtool's own unit tests of the three alerts (1 minute per sample).
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m",
             "input_series": [
                 {"series": 'gunicorn_ext_worker_breaker_open{job="gx",instance="a",slot="0"}',
                  "values": "0 0 0 0"},
                 {"series": 'gunicorn_ext_worker_breaker_open{job="gx",instance="a",slot="1"}',
                  "values": "0 0 1 1"},
                 {"series": 'gunicorn_ext_workers{job="gx",instance="a",kind="target"}',
                  "values": "2 2 2 2 2 2"},
                 {"series": 'gunicorn_ext_workers{job="gx",instance="a",kind="live"}',
                  "values": "2 1 1 1 1 1"},
                 {"series": 'gunicorn_ext_worker_rss_bytes{job="gx",instance="a",slot="0"}',
                  "values": "950 950 950 950 950 950 950 950"},
                 {"series": 'gunicorn_ext_worker_rss_bytes{job="gx",instance="a",slot="1"}',
                  "values": "500 500 500 500 500 500 500 500"},
                 {"series": 'gunicorn_ext_memory_limit_bytes{job="gx",instance="a",kind="soft"}',
                  "values": "1000 1000 1000 1000 1000 1000 1000 1000"},
                 {"series": 'gunicorn_ext_memory_limit_bytes{job="gx",instance="a",kind="hard"}',
                  "values": "2000 2000 2000 2000 2000 2000 2000 2000"},
                 {"series": 'gunicorn_ext_worker_rss_bytes{job="gx",instance="b",slot="0"}',
                  "values": "950 950 950 950 950 950 950 950"},  # no limit on b: no alert
             ],
             "promql_expr_test": [
                 {"expr": "instance_slot:gunicorn_ext_worker_rss:ratio_of_limit", "eval_time": "1m",
                  "exp_samples": [
                      {"labels": 'instance_slot:gunicorn_ext_worker_rss:ratio_of_limit'
                                 '{job="gx",instance="a",slot="0"}', "value": 0.95},
                      {"labels": 'instance_slot:gunicorn_ext_worker_rss:ratio_of_limit'
                                 '{job="gx",instance="a",slot="1"}', "value": 0.5}]},
             ],
             "alert_rule_test": [
                 {"alertname": "GunicornExtBreakerOpen", "eval_time": "1m", "exp_alerts": []},
                 {"alertname": "GunicornExtBreakerOpen", "eval_time": "3m", "exp_alerts": [
                     {"exp_labels": {"severity": "critical", "job": "gx", "instance": "a", "slot": "1"},
                      "exp_annotations": {
                          "summary": "a: the restart breaker of slot 1 is open",
                          "description": "Slot 1 crashed restart_breaker_failures times within "
                                         "restart_breaker_window and is no longer respawned. The "
                                         "primary's log has the last cause and traceback; fix the "
                                         "app, then run `gunicorn-ext reload --rolling`.\n"}}]},
                 {"alertname": "GunicornExtWorkersBelowTarget", "eval_time": "2m", "exp_alerts": []},
                 {"alertname": "GunicornExtWorkersBelowTarget", "eval_time": "4m", "exp_alerts": [
                     {"exp_labels": {"severity": "warning", "job": "gx", "instance": "a"},
                      "exp_annotations": {
                          "summary": "a: 1 live workers, fewer than the target",
                          "description": "For 2 minutes the instance has had fewer workers than "
                                         "configured: slots are in restart back-off or their "
                                         "breaker is open. See `gunicorn-ext status` or the admin "
                                         "endpoint's /status and /readyz.\n"}}]},
                 {"alertname": "GunicornExtRSSNearLimit", "eval_time": "4m", "exp_alerts": []},
                 {"alertname": "GunicornExtRSSNearLimit", "eval_time": "6m", "exp_alerts": [
                     {"exp_labels": {"severity": "warning", "job": "gx", "instance": "a",
                                     "slot": "0"},
                      "exp_annotations": {
                          "summary": "a: slot 0 RSS above 90% of its limit",
                          "description": "The worker of slot 0 has used more than 90% of its RSS "
                                         "limit for 5 minutes (95%): it is about to be recycled "
                                         "(soft limit) or killed (hard limit). A leak, or a limit "
                                         "set too low.\n"}}]},
             ]},
        ],
    }
    unit = tmp_path / "rules_test.yml"
    unit.write_text(json.dumps(tests))  # JSON is YAML
    r = subprocess.run([tool("promtool"), "test", "rules", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_dashboard_names_only_exported_metrics_and_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    exported = exported_names()
    used = set()
    for expr in exprs:
        names = set(METRIC.findall(expr))
        assert names, expr
        assert names <= exported, (expr, names - exported)
        used |= names
    assert len(used) >= 10  # the dashboard covers the families, not one or two
    # Prometheus' own parser: every expression as a recording rule, through promtool.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": concrete(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))
    r = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the real thing ------------------------------------------------------------------------


class Prometheus:
    """A throw-away Prometheus server; its HTTP API as small helpers."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _api(self, path: str, **params: Any) -> Any:
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", **params)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        data = self._api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)
        return list(data["result"])

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self._api("rules")["groups"] for r in g["rules"]]


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited (rc={proc.returncode}):\n{tail(log)}")
            try:
                return requests.get(f"{url}/-/ready", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, 30, what="prometheus ready")
        yield Prometheus(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class PacedLoad:
    """Requests to ``url`` at ``rate`` per second from a few threads; every completion timed."""

    def __init__(self, url: str, rate: float, threads: int = 4) -> None:
        self.url = url
        self.interval = threads / rate
        self.stop = threading.Event()
        self.done: list[float] = []  # wall-clock completion times of 200s
        self.failed: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        t0 = time.monotonic() + i * self.interval / len(self._threads)
        with requests.Session() as s:
            for n in range(MAX_LOAD_REQUESTS // len(self._threads)):
                delay = t0 + n * self.interval - time.monotonic()
                if self.stop.wait(max(0.0, delay)):
                    return
                try:
                    r = s.get(self.url, timeout=10)
                    ok = r.status_code == 200
                except requests.RequestException as exc:
                    ok = False
                    self.failed.append(repr(exc))
                with self._lock:
                    if ok:
                        self.done.append(time.time())

    def __enter__(self) -> PacedLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=20)

    def between(self, a: float, b: float) -> int:
        with self._lock:
            return sum(1 for t in self.done if a <= t < b)


def series_by_slot(result: list[dict[str, Any]]) -> dict[str, Any]:
    return {r["metric"]["slot"]: r for r in result}


def test_prometheus_scrapes_the_example_admin_endpoint(gunicorn_factory: Callable[..., Gunicorn],
                                                       tmp_path: Path) -> None:
    admin = free_port()
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2,
                         env={"ADMIN_BIND": f"127.0.0.1:{admin}", "SECRET_KEY": "test-prom",
                              "STATE_URL": f"sqlite:///{tmp_path}/state.db"})
    target = f"127.0.0.1:{admin}"
    with running_prometheus(tmp_path, target) as prom:
        sel = f'{{job="{JOB}",instance="{target}"}}'
        wait_for(lambda: [r["value"][1] for r in prom.query(f"up{sel}")] == ["1"], 20,
                 what="the admin endpoint scraped")
        # Per-slot series exist for every per-worker family.
        for name in ("gunicorn_ext_requests_total", "gunicorn_ext_request_duration_seconds_count",
                     "gunicorn_ext_requests_inflight", "gunicorn_ext_worker_rss_bytes",
                     "gunicorn_ext_worker_cpu_percent"):
            wait_for(lambda name=name: set(series_by_slot(prom.query(f"{name}{sel}"))) == {"0", "1"},
                     15, what=f"{name} for slots 0 and 1")
        assert {r["metric"]["kind"]: r["value"][1] for r in prom.query(f"gunicorn_ext_workers{sel}")} \
            == {"target": "2", "live": "2"}

        def total(at: float | None = None) -> float:
            return sum(float(r["value"][1]) for r in prom.query(
                f"gunicorn_ext_requests_total{sel}", at))

        time.sleep(1.5)  # settled: readiness pings reported and scraped
        before_at = time.time()
        before = total(before_at)
        with PacedLoad(g.url("/healthz"), LOAD_RATE) as load:
            time.sleep(LOAD_SECONDS)
        end = time.time()
        assert not load.failed, load.failed[:3]
        sent = load.between(0, end + 1)
        # rate() over a window inside the steady load, against what the test sent in it.
        at = end - 1.5
        want = load.between(at - RATE_WINDOW - 0.5, at - 0.5) / RATE_WINDOW
        got = float(prom.query(f"sum(rate(gunicorn_ext_requests_total{sel}[{RATE_WINDOW}s]))",
                               at)[0]["value"][1])
        print(f"rate(): Prometheus {got:.2f}/s, the test sent {want:.2f}/s ({sent} requests)")
        assert abs(got - want) <= 0.1 * want, (got, want)
        # Nothing lost between the workers, the primary and Prometheus: the exact count.
        wait_for(lambda: total() - before == sent, 10, what=f"all {sent} requests counted")

        # A worker SIGKILLed under load: its slot's counters go on from where they were.
        pid0 = next(w["pid"] for w in requests.get(f"http://{target}/status", timeout=5).json()["workers"]
                    if w["slot"] == 0)
        with PacedLoad(g.url("/healthz"), LOAD_RATE) as load2:
            time.sleep(1.5)
            g_pids = set(g.worker_pids())
            assert pid0 in g_pids
            os.kill(pid0, signal.SIGKILL)
            wait_for(lambda: requests.get(f"http://{target}/readyz", timeout=5).status_code == 200
                     and pid0 not in g.worker_pids(), 20, what="slot 0 replaced and ready")
            time.sleep(2)  # the replacement serves and is scraped
        assert len(load2.failed) <= 4, load2.failed  # at most what the killed worker held
        time.sleep(1.2)  # the last counts scraped
        span_start, span_end = before_at - 1, time.time()
        rng = prom.query_range(f"gunicorn_ext_requests_total{sel}", span_start, span_end)
        by_slot = series_by_slot(rng)
        assert set(by_slot) == {"0", "1"}
        for slot, series in by_slot.items():
            values = [float(v) for _, v in series["values"]]
            assert len(values) > 10
            assert all(b >= a for a, b in zip(values, values[1:], strict=False)), (slot, values)
        window = f"{int(span_end - span_start) + 2}s"
        resets = {r["metric"]["slot"]: r["value"][1] for r in prom.query(
            f"resets(gunicorn_ext_requests_total{sel}[{window}])")}
        assert resets == {"0": "0", "1": "0"}
        resets = {r["metric"]["slot"]: r["value"][1] for r in prom.query(
            f"resets(gunicorn_ext_request_duration_seconds_count{sel}[{window}])")}
        assert resets == {"0": "0", "1": "0"}
        restarts = {r["metric"]["slot"]: float(r["value"][1]) for r in prom.query(
            f"gunicorn_ext_worker_restarts_total{sel}")}
        assert restarts == {"0": 1.0, "1": 0.0}
        # Slot 0 kept counting after the kill (the replacement serves and reports).
        assert float(by_slot["0"]["values"][-1][1]) > float(by_slot["0"]["values"][0][1])

        # The shipped rules load and evaluate cleanly; nothing fires on a healthy instance.
        rules = prom.rules()
        assert len(rules) == 7 and all(r["health"] == "ok" for r in rules), rules
        assert all(r.get("state", "inactive") == "inactive" for r in rules if r["type"] == "alerting")
        # Every dashboard expression runs on the real data; all but the limits (unset here) have it.
        for expr in dashboard_exprs():
            result = prom.query(concrete(expr, instance=target, rate_interval="5s"))
            if "memory_limit" not in expr:
                assert result, expr
