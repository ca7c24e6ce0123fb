"""Cluster metrics: worker snapshots, the primary's merge, and the exposition (no processes)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    Summary,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from gunicorn_ext.metrics import DEFAULT_BUCKETS, ClusterMetrics, WorkerStats

SampleKey = tuple[str, frozenset[tuple[str, str]]]


def families(cm: ClusterMetrics) -> dict[str, Any]:
    """The rendered page, parsed back (so every test also checks that it parses)."""
    return {f.name: f for f in text_string_to_metric_families(cm.render().decode())}


def samples(cm: ClusterMetrics | dict[str, Any]) -> dict[SampleKey, float]:
    out: dict[SampleKey, float] = {}
    for fam in (families(cm) if isinstance(cm, ClusterMetrics) else cm).values():
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def counter_samples(fams: dict[str, Any]) -> dict[SampleKey, float]:
    """Every counter-like series: counters, histogram buckets/sum/count, summary sum/count."""
    out: dict[SampleKey, float] = {}
    for fam in fams.values():
        for s in fam.samples:
            if (fam.type == "counter"
                    or (fam.type == "histogram" and s.name != fam.name)
                    or (fam.type == "summary" and s.name != fam.name)):
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(cm: ClusterMetrics, name: str, **labels: str) -> float | None:
    return samples(cm).get((name, frozenset(labels.items())))


class App:
    """One worker's app metrics on a private registry, and its WorkerStats."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.hits = Counter("app_hits", "Hits.", registry=self.registry)
        self.calls = Counter("app_calls", "Calls by route.", ["route"], registry=self.registry)
        self.temp = Gauge("app_temperature", "A gauge.", registry=self.registry)
        self.size = Histogram("app_size", "A histogram.", buckets=(1, 10), registry=self.registry)
        self.took = Summary("app_took_seconds", "A summary.", registry=self.registry)
        self.stats = WorkerStats(registry=self.registry)

    def work(self, n: int = 1, seconds: float = 0.02) -> None:
        for i in range(n):
            self.stats.request_started()
            self.hits.inc()
            self.calls.labels(route=f"/r{i % 2}").inc()
            self.temp.set(20 + i)
            self.size.observe(i)
            self.took.observe(seconds)
            self.stats.request_finished(seconds)


# -- worker side ---------------------------------------------------------------


def test_latency_buckets_use_le_and_are_not_cumulative() -> None:
    w = WorkerStats(buckets=(0.1, 1.0), registry=None)
    for seconds in (0.0, 0.1, 0.5, 1.0, 1.5, math.inf, math.nan, -3.0):
        w.request_started()
        w.request_finished(seconds)
    snap = w.snapshot()
    # 0, 0.1, nan->0, -3->0 | 0.5, 1.0 | 1.5, inf
    assert snap["latency"]["buckets"] == [4, 2, 2]
    assert snap["latency"]["count"] == snap["requests"] == w.requests == 8
    assert snap["latency"]["sum"] == math.inf
    assert snap["inflight"] == w.inflight == 0
    assert snap["app"] == []


def test_a_request_lands_in_the_first_bound_at_or_above_it_whatever_the_bounds() -> None:
    # The first bucket is found without a search: the bounds around it still decide.
    w = WorkerStats(buckets=(-1.0, 0.0, 2.0), registry=None)
    for seconds in (0.0, 0.5, -1.0, 2.0, 2.5):  # -1 counts as 0
        w.request_finished(seconds)
    assert w.snapshot()["latency"]["buckets"] == [0, 2, 2, 1]
    none = WorkerStats(buckets=(), registry=None)
    none.request_finished(0.3)
    assert none.snapshot()["latency"]["buckets"] == [1] and none.requests == 1


def test_bucket_bounds() -> None:
    assert WorkerStats().buckets == DEFAULT_BUCKETS
    assert WorkerStats(buckets=(1.0, 0.5, 1.0, math.inf)).buckets == (0.5, 1.0)
    assert WorkerStats(buckets=()).snapshot(include_app=False)["latency"]["buckets"] == [0]
    for bad in ((math.nan,), (-math.inf, 1.0)):
        with pytest.raises(ValueError):
            WorkerStats(buckets=bad)


def test_inflight_counts_started_not_finished() -> None:
    w = WorkerStats(registry=None)
    w.request_started()
    w.request_started()
    w.request_finished(0.01)
    assert (w.inflight, w.requests) == (1, 1)
    w.request_finished(0.01)
    w.request_finished(0.01)  # unmatched: inflight stays at 0
    assert (w.inflight, w.requests) == (0, 3)


def test_counting_is_thread_safe() -> None:
    w = WorkerStats(registry=None)
    n, per = 8, 5000

    def run() -> None:
        for i in range(per):
            w.request_started()
            w.request_finished(i % 3 * 0.3)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = w.snapshot()
    assert snap["requests"] == sum(snap["latency"]["buckets"]) == n * per
    assert snap["inflight"] == 0


def test_snapshot_is_msgpack_round_trippable() -> None:
    app = App()
    app.work(5)
    app.stats.request_started()
    snap = app.stats.snapshot()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(snap)) == snap
    assert snap["inflight"] == 1 and snap["requests"] == 5


def test_snapshot_app_families() -> None:
    app = App()
    app.work(3)
    fams = {f["name"]: f for f in app.stats.snapshot()["app"]}
    assert {n: f["type"] for n, f in fams.items()} == {
        "app_hits": "counter", "app_calls": "counter", "app_temperature": "gauge",
        "app_size": "histogram", "app_took_seconds": "summary",
    }
    assert fams["app_hits"]["help"] == "Hits."
    assert fams["app_hits"]["samples"] == [["app_hits_total", {}, 3.0]]
    assert sorted(map(tuple, [(s[0], s[1]["route"], s[2]) for s in fams["app_calls"]["samples"]])) == [
        ("app_calls_total", "/r0", 2.0), ("app_calls_total", "/r1", 1.0)]
    assert ["app_size_bucket", {"le": "+Inf"}, 3.0] in fams["app_size"]["samples"]
    names = {s[0] for f in fams.values() for s in f["samples"]}
    assert not any(n.endswith("_created") for n in names)
    assert app.stats.snapshot(include_app=False)["app"] == []


def test_default_collectors_and_reserved_prefix_are_skipped() -> None:
    reg = CollectorRegistry()
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    Gauge("gunicorn_ext_mine", "Reserved prefix.", registry=reg).set(1)
    Gauge("kept", "Kept.", registry=reg).set(1)
    assert [f["name"] for f in WorkerStats(registry=reg).snapshot()["app"]] == ["kept"]



def test_the_default_registry_s_own_collectors_are_not_even_collected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """prometheus_client's default collectors yield only skipped families, so a snapshot
    of its REGISTRY (what every worker reports once a second) does not collect them."""
    import prometheus_client

    called: list[str] = []
    for name in ("PROCESS_COLLECTOR", "PLATFORM_COLLECTOR", "GC_COLLECTOR"):
        c = getattr(prometheus_client, name)
        monkeypatch.setattr(c, "collect", lambda name=name: called.append(name) or iter(()))
    g = Gauge("test_default_registry_kept", "Kept.")
    try:
        g.set(2)
        app = WorkerStats().snapshot()["app"]
    finally:
        prometheus_client.REGISTRY.unregister(g)
    assert called == []
    assert [f["samples"] for f in app if f["name"] == "test_default_registry_kept"] == [
        [["test_default_registry_kept", {}, 2.0]]]


class _Raises:
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("broken collector")


class _RaisesHalfway:
    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("halfway", "Yielded before the failure.")
        g.add_metric([], 1)
        yield g
        raise RuntimeError("broken half way")


class _Junk:
    def collect(self) -> Iterator[Any]:
        yield object()
        bad = GaugeMetricFamily("odd_values", "Some values are not numbers.")
        bad.add_metric([], 1)
        bad.samples.append(bad.samples[0]._replace(value="x"))
        bad.samples.append(bad.samples[0]._replace(value=None))
        yield bad


def test_misbehaving_collectors_cost_only_their_own_families() -> None:
    reg = CollectorRegistry()
    Counter("before", "Registered first.", registry=reg).inc()
    for c in (_Raises(), _RaisesHalfway(), _Junk()):
        reg.register(c)  # type: ignore[arg-type]
    Counter("after", "Registered last.", registry=reg).inc()
    fams = {f["name"]: f for f in WorkerStats(registry=reg).snapshot()["app"]}
    assert set(fams) == {"before", "halfway", "odd_values", "after"}
    assert fams["odd_values"]["samples"] == [["odd_values", {}, 1.0]]


def test_a_plain_collector_as_registry() -> None:
    """Anything with collect() works; failing half way keeps what came before."""
    fams = WorkerStats(registry=_RaisesHalfway()).snapshot()["app"]  # type: ignore[arg-type]
    assert [f["name"] for f in fams] == ["halfway"]


# -- primary side --------------------------------------------------------------


def test_render_parses_with_every_metric() -> None:
    app = App()
    app.work(4)
    app.stats.request_started()
    app.calls.labels(route="/x")  # a labelled child never incremented
    cm = ClusterMetrics()
    cm.update(0, 100, app.stats.snapshot())
    cm.set_process(0, 100, 50_000_000, 12.5)
    cm.set_restarts(0, 2)
    cm.set_restart_state(0, 1.5, True)
    cm.set_workers(4, 3)
    cm.set_memory_limits(0, 1 << 30)  # 0: off, not exported
    fams = families(cm)
    assert {n: f.type for n, f in fams.items()} == {
        "gunicorn_ext_requests": "counter",
        "gunicorn_ext_request_duration_seconds": "histogram",
        "gunicorn_ext_requests_inflight": "gauge",
        "gunicorn_ext_worker_rss_bytes": "gauge",
        "gunicorn_ext_worker_cpu_percent": "gauge",
        "gunicorn_ext_worker_restarts": "counter",
        "gunicorn_ext_worker_backoff_seconds": "gauge",
        "gunicorn_ext_worker_breaker_open": "gauge",
        "gunicorn_ext_workers": "gauge",
        "gunicorn_ext_memory_limit_bytes": "gauge",
        "app_hits": "counter", "app_calls": "counter", "app_temperature": "gauge",
        "app_size": "histogram", "app_took_seconds": "summary",
    }
    assert fams["app_hits"].documentation == "Hits."
    got = samples(cm)
    assert got[("gunicorn_ext_requests_total", frozenset({("slot", "0")}))] == 4
    assert got[("gunicorn_ext_requests_inflight", frozenset({("slot", "0")}))] == 1
    assert got[("gunicorn_ext_worker_rss_bytes", frozenset({("slot", "0")}))] == 50_000_000
    assert got[("gunicorn_ext_worker_cpu_percent", frozenset({("slot", "0")}))] == 12.5
    assert got[("gunicorn_ext_worker_restarts_total", frozenset({("slot", "0")}))] == 2
    assert got[("gunicorn_ext_worker_backoff_seconds", frozenset({("slot", "0")}))] == 1.5
    assert got[("gunicorn_ext_worker_breaker_open", frozenset({("slot", "0")}))] == 1
    assert got[("gunicorn_ext_workers", frozenset({("kind", "target")}))] == 4
    assert got[("gunicorn_ext_workers", frozenset({("kind", "live")}))] == 3
    assert got[("gunicorn_ext_memory_limit_bytes", frozenset({("kind", "hard")}))] == 1 << 30
    assert ("gunicorn_ext_memory_limit_bytes", frozenset({("kind", "soft")})) not in got
    assert got[("app_calls_total", frozenset({("slot", "0"), ("route", "/r0")}))] == 2
    assert got[("app_calls_total", frozenset({("slot", "0"), ("route", "/x")}))] == 0
    assert got[("app_size_bucket", frozenset({("slot", "0"), ("le", "10.0")}))] == 4
    assert got[("app_took_seconds_count", frozenset({("slot", "0")}))] == 4
    # The latency histogram is exported cumulative, with the +Inf bucket equal to the count.
    buckets = [s.value for s in fams["gunicorn_ext_request_duration_seconds"].samples
               if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and len(buckets) == len(DEFAULT_BUCKETS) + 1
    assert buckets[-1] == 4 and buckets[0] == 0
    assert all(s.name.rsplit("_", 1)[-1] != "created" for f in fams.values() for s in f.samples)
    assert b"_created" not in cm.render()


def test_empty_cluster_renders() -> None:
    fams = families(ClusterMetrics())
    assert "gunicorn_ext_requests" in fams and fams["gunicorn_ext_requests"].samples == []


def test_app_slot_label_is_renamed() -> None:
    reg = CollectorRegistry()
    Counter("tagged", "Has its own slot label.", ["slot"], registry=reg).labels("blue").inc()
    cm = ClusterMetrics()
    cm.update(3, 100, WorkerStats(registry=reg).snapshot())
    assert value(cm, "tagged_total", slot="3", exported_slot="blue") == 1


def test_counters_survive_a_worker_exit_and_gauges_go() -> None:
    cm = ClusterMetrics()
    old = App()
    old.work(3)
    old.stats.request_started()
    cm.update(0, 100, old.stats.snapshot())
    cm.set_process(0, 100, 1000, 1.0)
    cm.worker_exited(0, 100)
    got = samples(cm)
    assert value(cm, "gunicorn_ext_requests_total", slot="0") == 3
    assert value(cm, "app_hits_total", slot="0") == 3
    assert value(cm, "app_size_count", slot="0") == 3
    assert value(cm, "app_took_seconds_sum", slot="0") == pytest.approx(0.06)
    gone = {"gunicorn_ext_requests_inflight", "gunicorn_ext_worker_rss_bytes",
            "gunicorn_ext_worker_cpu_percent", "app_temperature"}
    assert not [k for k in got if k[0] in gone]

    new = App()
    new.work(2)
    cm.update(0, 200, new.stats.snapshot())
    assert value(cm, "gunicorn_ext_requests_total", slot="0") == 5
    assert value(cm, "app_calls_total", slot="0", route="/r0") == 3
    assert value(cm, "app_calls_total", slot="0", route="/r1") == 2
    assert value(cm, "app_size_bucket", slot="0", le="+Inf") == 5
    assert value(cm, "gunicorn_ext_request_duration_seconds_count", slot="0") == 5
    assert value(cm, "app_temperature", slot="0") == 21  # the new worker's gauge only
    assert value(cm, "gunicorn_ext_requests_inflight", slot="0") == 0


def test_a_new_pid_retires_the_old_one() -> None:
    cm = ClusterMetrics()
    old, new = App(), App()
    old.work(3)
    cm.update(1, 100, old.stats.snapshot())
    cm.set_process(1, 100, 1000, 1.0)
    new.work(1)
    cm.update(1, 200, new.stats.snapshot())  # no worker_exited(1, 100) came
    assert value(cm, "gunicorn_ext_requests_total", slot="1") == 4
    assert value(cm, "gunicorn_ext_worker_rss_bytes", slot="1") is None
    cm.worker_exited(1, 100)  # arriving late changes nothing
    assert value(cm, "gunicorn_ext_requests_total", slot="1") == 4
    assert value(cm, "app_temperature", slot="1") == 20


def test_late_snapshot_from_an_exited_worker_is_ignored() -> None:
    cm = ClusterMetrics()
    old = App()
    old.work(2)
    cm.update(0, 100, old.stats.snapshot())
    cm.worker_exited(0, 100)
    before = cm.render()
    old.work(5)
    cm.update(0, 100, old.stats.snapshot())
    cm.set_process(0, 100, 1000, 1.0)
    assert cm.render() == before
    new = App()
    cm.update(0, 200, new.stats.snapshot())
    cm.update(0, 100, old.stats.snapshot())
    assert value(cm, "gunicorn_ext_requests_total", slot="0") == 2


def test_a_counter_reset_inside_a_worker_does_not_go_backwards() -> None:
    cm = ClusterMetrics()
    app = App()
    app.work(4)
    cm.update(0, 100, app.stats.snapshot())
    app.registry.unregister(app.hits)  # the family vanishes...
    cm.update(0, 100, app.stats.snapshot())
    assert value(cm, "app_hits_total", slot="0") == 4
    app.hits = Counter("app_hits", "Hits.", registry=app.registry)  # ...and restarts at 0
    app.hits.inc()
    cm.update(0, 100, app.stats.snapshot())
    assert value(cm, "app_hits_total", slot="0") == 5
    app.calls.remove("/r0")  # a labelled child removed
    cm.update(0, 100, app.stats.snapshot())
    assert value(cm, "app_calls_total", slot="0", route="/r0") == 2


def test_restarts_never_go_backwards() -> None:
    cm = ClusterMetrics()
    for n, want in ((1, 1), (3, 3), (0, 3), (2, 5)):
        cm.set_restarts(0, n)
        assert value(cm, "gunicorn_ext_worker_restarts_total", slot="0") == want


def test_restart_state_and_workers_are_replaced() -> None:
    cm = ClusterMetrics()
    cm.set_restart_state(2, 4.0, True)
    cm.set_restart_state(2, 0.0, False)
    cm.set_workers(4, 4)
    cm.set_workers(2, 1)
    assert value(cm, "gunicorn_ext_worker_backoff_seconds", slot="2") == 0
    assert value(cm, "gunicorn_ext_worker_breaker_open", slot="2") == 0
    assert value(cm, "gunicorn_ext_workers", kind="target") == 2
    assert value(cm, "gunicorn_ext_workers", kind="live") == 1


def test_other_latency_buckets_are_ignored_not_misread() -> None:
    cm = ClusterMetrics()
    w = WorkerStats(buckets=(1.0,), registry=None)
    w.request_finished(0.5)
    cm.update(0, 100, w.snapshot())
    assert value(cm, "gunicorn_ext_requests_total", slot="0") == 1
    assert value(cm, "gunicorn_ext_request_duration_seconds_count", slot="0") is None
    cm2 = ClusterMetrics(buckets=(1.0,))
    cm2.update(0, 100, w.snapshot())
    assert value(cm2, "gunicorn_ext_request_duration_seconds_bucket", slot="0", le="1.0") == 1


def test_slots_disagreeing_on_a_type_still_render() -> None:
    """During a reload old and new code may export one name with two types."""
    cm = ClusterMetrics()
    a, b = CollectorRegistry(), CollectorRegistry()
    Counter("thing", "Old.", registry=a).inc()
    Gauge("thing", "New.", registry=b).set(7)
    cm.update(0, 100, WorkerStats(registry=a).snapshot())
    cm.update(1, 101, WorkerStats(registry=b).snapshot())
    fams = families(cm)
    assert fams["thing"].type == "counter"
    assert [s.labels["slot"] for s in fams["thing"].samples] == ["0"]


def test_render_is_a_registrable_collector() -> None:
    cm = ClusterMetrics()
    cm.set_workers(1, 1)
    reg = CollectorRegistry()
    reg.register(cm)
    assert any(m.name == "gunicorn_ext_workers" for m in reg.collect())


# -- properties ----------------------------------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["requests", "inflight", "latency", "buckets", "sum",
                                       "count", "app", "name", "type", "help", "samples"])
                      | st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(junk, max_size=4))
def test_malformed_snapshots_never_raise(snaps: list[Any]) -> None:
    cm = ClusterMetrics()
    for i, snap in enumerate(snaps):
        cm.update(i % 2, 100 + i % 3, snap)
    families(cm)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_counters_never_go_backwards(data: st.DataObject) -> None:
    """Random updates, exits, replacements and late snapshots over three slots."""
    cm = ClusterMetrics()
    workers: dict[int, tuple[int, App]] = {}  # pid -> (slot, app)
    current: dict[int, int] = {}  # slot -> pid (model)
    exited: set[int] = set()
    last_accepted: dict[int, int] = {}  # pid -> requests in its last accepted snapshot
    next_pid = 100
    prev: dict[SampleKey, float] = {}
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        slot = data.draw(st.integers(0, 2), label="slot")
        op = data.draw(st.sampled_from(["work", "work", "new", "exit", "late"]), label="op")
        if op == "new" or (op == "work" and slot not in current):
            pid, next_pid = next_pid, next_pid + 1
            workers[pid] = (slot, App())
            op = "work"
        elif op == "work":
            pid = current[slot]
        elif op == "exit":
            pid = current.pop(slot, 0)
            if pid:
                exited.add(pid)
                cm.worker_exited(slot, pid)
            op = ""
        else:  # late: an exited worker of this slot does more work and reports it
            old = [p for p in sorted(exited) if workers[p][0] == slot]
            if not old:
                continue
            pid = data.draw(st.sampled_from(old), label="late pid")
        if op in ("work", "late"):
            app = workers[pid][1]
            app.work(data.draw(st.integers(0, 3), label="requests"),
                     data.draw(st.sampled_from([0.001, 0.03, 0.6, 4.0, 30.0]), label="seconds"))
            if data.draw(st.booleans(), label="inflight"):
                app.stats.request_started()
            if op == "work":
                if current.get(slot, pid) != pid:
                    exited.add(current[slot])
                current[slot] = pid
                last_accepted[pid] = app.stats.requests
            cm.update(slot, pid, app.stats.snapshot())
        fams = families(cm)
        now = counter_samples(fams)
        for key, was in prev.items():
            assert key in now, f"{key} disappeared"
            assert now[key] >= was, f"{key} went from {was} to {now[key]}"
        prev = now
        got = samples(fams)
        for s in range(3):
            one = frozenset({("slot", str(s))})
            pids = [p for p, (ps, _) in workers.items() if ps == s and p in last_accepted]
            want = sum(last_accepted[p] for p in pids)
            assert got.get(("gunicorn_ext_requests_total", one), 0) == want
            assert got.get(("app_hits_total", one)) == (want if pids else None)
            live = s in current and current[s] in last_accepted
            assert (("gunicorn_ext_requests_inflight", one) in got) == live
            assert (("app_temperature", one) in got) == live  # gauges: the live worker's only
