"""Cluster-wide Prometheus metrics, gathered over the bus.

Each worker keeps a :class:`WorkerStats`: request counts, in-flight requests and
a latency histogram, bumped around every request, plus the app's own
prometheus_client metrics read from the worker's registry when a snapshot is
taken. Snapshots are plain dicts (msgpack-able) that the worker sends to the
primary now and then.

The primary keeps a :class:`ClusterMetrics`: the latest snapshot of every slot's
worker, what the primary samples itself (RSS, CPU, restarts, back-off), and a
per-slot *base* holding everything counter-like that dead workers reported.
A replacement worker starts from zero, but the exported value of a slot is
base + live, so counters never go backwards and ``rate()`` stays right. Nothing
is written to disk: no ``PROMETHEUS_MULTIPROC_DIR`` and none of its file
pile-up (prometheus/client_python#2738, benoitc/gunicorn#2791).

Every exported series carries a ``slot`` label (the worker's position, stable
across restarts) and never a pid, which would make a new series per restart.
The ``gunicorn_ext_`` prefix is reserved: app metrics named so are not exported.
"""

from __future__ import annotations

import collections
import math
import threading
from _thread import get_ident as _get_ident  # the real thread, also under gevent
from bisect import bisect_left as _bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, REGISTRY
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import METRIC_TYPES, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

__all__ = ["CONTENT_TYPE", "DEFAULT_BUCKETS", "ClusterMetrics", "WorkerStats"]

#: Request latency bucket bounds in seconds (prometheus_client's defaults;
#: the ``+Inf`` bucket is implicit).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)
#: Content-Type of :meth:`ClusterMetrics.render`'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST

PREFIX = "gunicorn_ext_"
#: Families of prometheus_client's default collectors: the primary reports
#: per-worker RSS and CPU itself, and the rest is per-process noise.
_SKIP_PREFIXES = ("process_", "python_gc_", "python_info", PREFIX)
#: Types whose ``<name>_created`` sample is dropped: it is per process, and a
#: new one after every restart would read as a counter reset.
_WITH_CREATED = frozenset({"counter", "histogram", "summary"})
#: prometheus_client's default collectors (on its REGISTRY): their families are all
#: ``process_*``, ``python_gc_*`` and ``python_info``, which are skipped.
_DEFAULT_COLLECTORS = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)

_REQUESTS = PREFIX + "requests"  # a counter: its sample is ..._total
_DURATION = PREFIX + "request_duration_seconds"
_INFLIGHT = PREFIX + "requests_inflight"
_RSS = PREFIX + "worker_rss_bytes"
_CPU = PREFIX + "worker_cpu_percent"
_RESTARTS = PREFIX + "worker_restarts"  # a counter: its sample is ..._total
_BACKOFF = PREFIX + "worker_backoff_seconds"
_BREAKER = PREFIX + "worker_breaker_open"
_WORKERS = PREFIX + "workers"
_MEMORY_LIMIT = PREFIX + "memory_limit_bytes"

#: (type, help) of the built-in families, in output order.
_BUILTIN: dict[str, tuple[str, str]] = {
    _REQUESTS: ("counter", "Requests completed, per worker slot."),
    _DURATION: ("histogram", "Request duration in seconds, per worker slot."),
    _INFLIGHT: ("gauge", "Requests in progress, per worker slot."),
    _RSS: ("gauge", "Resident memory of the slot's worker process, in bytes."),
    _CPU: ("gauge", "CPU use of the slot's worker process, in percent of one CPU."),
    _RESTARTS: ("counter", "Times the slot's worker was restarted."),
    _BACKOFF: ("gauge", "Current restart back-off of the slot, in seconds."),
    _BREAKER: ("gauge", "1 while the slot's restart circuit breaker is open, 0.5 while it is "
                        "half-open (trying one worker), else 0."),
    _WORKERS: ("gauge", "Number of workers: kind=target (configured) or kind=live."),
    _MEMORY_LIMIT: ("gauge", "A worker's RSS limit in bytes: kind=soft (recycle) or kind=hard "
                             "(killed); absent when off."),
}
#: Exited pids remembered per slot, to drop their late snapshots.
_EXITED_MEMORY = 16


def _bounds(buckets: Sequence[float]) -> tuple[float, ...]:
    """Sorted, finite, distinct bucket bounds (a trailing ``+Inf`` is allowed and dropped)."""
    out = sorted({float(b) for b in buckets if float(b) != math.inf})
    if not all(math.isfinite(b) for b in out):
        raise ValueError(f"bucket bounds must be finite numbers: {list(buckets)!r}")
    return tuple(out)


# -- worker side ---------------------------------------------------------------


class _Cell:
    """One thread's request counts: written by that thread only, so without a lock.

    The requests finished are the sum of the bucket counts (no counter of their own)."""

    __slots__ = ("counts", "sum", "started", "bounds", "first")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: The lowest bound: a request at most this long is in the first bucket, which
        #: needs no search (most requests of a fast app are there).
        self.first = bounds[0] if bounds else -1.0
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; sum: requests
        self.sum = 0.0
        self.started = 0

    def finish(self, seconds: float) -> None:
        """Count a finished request that took ``seconds`` (NaN or negative counts as 0)."""
        if not seconds > 0.0:
            seconds = 0.0
        # The first bound >= seconds ("le").
        self.counts[0 if seconds <= self.first else _bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class WorkerStats:
    """A worker's request statistics, and the source of its snapshots.

    ``request_started``/``request_finished`` run on every request, from every thread
    of a gthread worker, so they take no lock: each thread counts into its own cell
    (threads are told apart by the real thread id, also under gevent's monkey-patching,
    where every greenlet runs on the worker's one thread; a new thread reusing an
    ident reuses its cell), and a snapshot adds the cells up. ``registry`` is where the
    app's own prometheus_client metrics live (None: no app metrics).
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS,
                 registry: Collector | None = REGISTRY) -> None:
        #: Latency bucket upper bounds in seconds, ``+Inf`` implicit.
        self.buckets: tuple[float, ...] = _bounds(buckets)
        self.registry = registry
        self._cells: dict[int, _Cell] = {}
        self._new_cell = threading.Lock()

    def _cell(self) -> _Cell:
        ident = _get_ident()
        with self._new_cell:
            cell = self._cells.get(ident)
            if cell is None:
                cell = self._cells[ident] = _Cell(self.buckets)
            return cell

    def _totals(self) -> tuple[list[int], float, int, int]:
        counts = [0] * (len(self.buckets) + 1)
        total = 0.0
        started = 0
        for cell in list(self._cells.values()):
            for i, c in enumerate(cell.counts):  # read before started: inflight stays >= 0
                counts[i] += c
            total += cell.sum
            started += cell.started
        return counts, total, started, sum(counts)

    @property
    def requests(self) -> int:
        """Requests completed."""
        return sum(self._totals()[0])

    @property
    def inflight(self) -> int:
        """Requests started and not finished."""
        _, _, started, finished = self._totals()
        return max(0, started - finished)

    def thread_cell(self) -> _Cell:
        """The counts of the calling thread. A caller that counts every request of a
        thread itself (the ASGI middleware, on its event loop's thread) keeps it:
        ``started += 1`` when one starts, :meth:`_Cell.finish` when it ends."""
        return self._cells.get(_get_ident()) or self._cell()

    def request_started(self) -> None:
        self.thread_cell().started += 1

    def request_finished(self, seconds: float) -> None:
        """Count a finished request that took ``seconds`` (NaN or negative counts as 0).

        It may run on another thread than its start. ``inflight`` is started minus
        finished, never below 0."""
        self.thread_cell().finish(seconds)

    def snapshot(self, include_app: bool = True) -> dict[str, Any]:
        """The worker's numbers as a msgpack-able dict, for :meth:`ClusterMetrics.update`.

        ``latency.buckets`` holds per-bucket (not cumulative) counts, the
        ``+Inf`` bucket last. ``app`` lists the registry's families as
        ``{"name", "type", "help", "samples": [[name, {labels}, value], ...]}``;
        a collector that raises or yields junk loses only its own families.
        """
        counts, total, started, finished = self._totals()
        requests = sum(counts)
        return {
            "requests": requests,
            "inflight": max(0, started - finished),
            "latency": {"buckets": counts, "sum": total, "count": requests},
            "app": _collect_app(self.registry) if include_app and self.registry is not None else [],
        }


def _collect_app(registry: Collector) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for collector in _collectors(registry):
        try:
            families = iter(collector.collect())
        except Exception:
            continue
        while True:
            try:
                family = next(families)
            except Exception:  # StopIteration, or a collector failing half way
                break
            try:
                d = _family_dict(family)
            except Exception:
                continue
            if d is not None:
                out.append(d)
    return out


def _collectors(registry: Collector) -> list[Any]:
    """The registry's collectors one by one, so that one failing costs only its own families.

    CollectorRegistry has no public way to list them; ``_collector_to_names``
    has held them since its first release. Anything else is collected whole.
    prometheus_client's default collectors are left out: every family they yield is
    dropped (``_SKIP_PREFIXES``), and collecting them (``/proc`` reads, an fd listing)
    was nearly all of a snapshot's cost, once a second in every worker.
    """
    names = getattr(registry, "_collector_to_names", None)
    lock = getattr(registry, "_lock", None)
    if isinstance(registry, CollectorRegistry) and isinstance(names, dict) and lock is not None:
        with lock:
            return [c for c in names if c not in _DEFAULT_COLLECTORS]
    return [registry]


def _family_dict(family: Metric) -> dict[str, Any] | None:
    name = family.name
    if not isinstance(name, str) or name.startswith(_SKIP_PREFIXES):
        return None
    created = name + "_created" if family.type in _WITH_CREATED else None
    samples: list[list[Any]] = []
    for s in family.samples:
        value = s.value
        if s.name == created or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # native-histogram samples have no plain value
        samples.append([str(s.name), {str(k): str(v) for k, v in s.labels.items()}, float(value)])
    return {"name": name, "type": str(family.type), "help": str(family.documentation),
            "samples": samples}


# -- primary side --------------------------------------------------------------

_Labels = tuple[tuple[str, str], ...]
_Key = tuple[str, _Labels]  # (sample name, sorted labels)


class _Family:
    """One family's samples from one worker: counter-like ones apart from the rest."""

    __slots__ = ("type", "help", "counters", "gauges")

    def __init__(self, typ: str, help: str) -> None:
        self.type = typ
        self.help = help
        self.counters: dict[_Key, float] = {}
        self.gauges: dict[_Key, float] = {}


class _Slot:
    __slots__ = ("pid", "live", "base", "exited", "rss", "cpu", "restarts", "restarts_base",
                 "backoff", "breaker")

    def __init__(self) -> None:
        self.pid = 0  # the current worker; 0 for none
        self.live: dict[str, _Family] = {}  # its latest snapshot
        self.base: dict[str, _Family] = {}  # counters of its predecessors, summed
        self.exited: collections.deque[int] = collections.deque(maxlen=_EXITED_MEMORY)
        self.rss: float | None = None
        self.cpu: float | None = None
        self.restarts: float | None = None
        self.restarts_base = 0.0
        self.backoff: float | None = None
        self.breaker: float | None = None


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def _is_counter(typ: str, family: str, sample: str) -> bool:
    if typ == "counter":
        return True
    if typ == "histogram":
        return sample in (family + "_bucket", family + "_sum", family + "_count")
    if typ == "summary":
        return sample in (family + "_sum", family + "_count")
    return False


def _parse(snapshot: Any, les: Sequence[str]) -> dict[str, _Family]:
    """A worker's snapshot as families; malformed parts are dropped, never raised."""
    out: dict[str, _Family] = {}
    if not isinstance(snapshot, dict):
        return out
    try:
        requests = _num(snapshot.get("requests"))
        fam = out[_REQUESTS] = _Family("counter", "")
        fam.counters[(_REQUESTS + "_total", ())] = requests
    except TypeError:
        pass
    try:
        inflight = _num(snapshot.get("inflight"))
        fam = out[_INFLIGHT] = _Family("gauge", "")
        fam.gauges[(_INFLIGHT, ())] = inflight
    except TypeError:
        pass
    try:
        latency = snapshot["latency"]
        counts = [_num(c) for c in latency["buckets"]]
        if len(counts) == len(les):  # else the worker used other buckets: skip it
            fam = _Family("histogram", "")
            cumulative = 0.0
            for le, c in zip(les, counts, strict=True):
                cumulative += c
                fam.counters[(_DURATION + "_bucket", (("le", le),))] = cumulative
            fam.counters[(_DURATION + "_sum", ())] = _num(latency["sum"])
            fam.counters[(_DURATION + "_count", ())] = _num(latency["count"])
            out[_DURATION] = fam
    except (TypeError, KeyError, IndexError):
        pass
    app = snapshot.get("app")
    for raw in app if isinstance(app, list) else ():
        try:
            _parse_family(raw, out)
        except (TypeError, KeyError, ValueError, AttributeError):
            continue
    return out


def _parse_family(raw: dict[str, Any], out: dict[str, _Family]) -> None:
    name, typ, help = raw["name"], raw["type"], raw.get("help", "")
    if not isinstance(name, str) or name.startswith(PREFIX) or not isinstance(help, str):
        return
    if typ == "untyped" or typ not in METRIC_TYPES:
        typ = "unknown"
    fam = out.get(name)
    if fam is None:
        fam = out[name] = _Family(typ, help)
    elif fam.type != typ:
        return
    created = name + "_created" if typ in _WITH_CREATED else None
    for sample in raw["samples"]:
        try:
            sname, labels, value = sample
            if not isinstance(sname, str) or sname == created:
                continue
            items = labels.items()
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in items):
                continue
            key = (sname, tuple(sorted(items)))
            if _is_counter(typ, name, sname):
                fam.counters[key] = _num(value)
            else:
                fam.gauges[key] = _num(value)
        except (TypeError, ValueError, AttributeError):
            continue


def _fold(base: dict[str, _Family], name: str, fam: _Family,
          keys: Iterable[_Key] | None = None) -> None:
    """Add ``fam``'s counters (or just those in ``keys``) to ``base``."""
    keys = list(fam.counters) if keys is None else list(keys)
    if not keys:
        return
    into = base.get(name)
    if into is None or into.type != fam.type:  # a new type under an old name: start over
        into = base[name] = _Family(fam.type, fam.help)
    for key in keys:
        into.counters[key] = into.counters.get(key, 0.0) + fam.counters[key]


class ClusterMetrics(Collector):
    """The primary's view of every slot, rendered as one Prometheus page.

    Fed by one thread (the hub's); :meth:`render` may run on any thread.
    ``buckets`` must be the workers' :attr:`WorkerStats.buckets`: a snapshot
    with another bucket count has its latency histogram ignored.

    It is itself a prometheus_client collector (:meth:`collect`), so it can
    also be registered on another registry.
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self._les = [floatToGoString(b) for b in _bounds(buckets)] + ["+Inf"]
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._workers: tuple[int, int] | None = None
        self._memory_limits: dict[str, float] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- feeding --------------------------------------------------------------

    def update(self, slot: int, pid: int, snapshot: dict[str, Any]) -> None:
        """Take the latest snapshot of worker ``pid`` in ``slot``.

        A new pid retires the slot's previous worker (as :meth:`worker_exited`);
        a snapshot from a pid that already exited is dropped. Within one
        worker, a counter that went down (or vanished) is taken as a reset:
        what it had reached is kept in the base.
        """
        parsed = _parse(snapshot, self._les)
        with self._lock:
            s = self._adopt(slot, pid)
            if s is None:
                return
            for name, old in s.live.items():
                new = parsed.get(name)
                if new is None or new.type != old.type:
                    _fold(s.base, name, old)
                else:
                    _fold(s.base, name, old,
                          [k for k, v in old.counters.items() if new.counters.get(k, 0.0) < v])
            s.live = parsed

    def worker_exited(self, slot: int, pid: int) -> None:
        """Worker ``pid`` of ``slot`` is gone: keep its counters, drop its gauges."""
        with self._lock:
            s = self._slot(slot)
            if s.pid == pid:
                self._retire(s)
            elif pid not in s.exited:
                s.exited.append(pid)

    def set_process(self, slot: int, pid: int, rss: int, cpu_percent: float) -> None:
        """Resident memory and CPU of worker ``pid``, as sampled by the primary."""
        with self._lock:
            s = self._adopt(slot, pid)
            if s is not None:
                s.rss = float(rss)
                s.cpu = float(cpu_percent)

    def set_restarts(self, slot: int, restarts: int) -> None:
        """The slot's restart count; should it ever go down, the exported counter does not."""
        with self._lock:
            s = self._slot(slot)
            value = float(restarts)
            if s.restarts is not None and value < s.restarts:
                s.restarts_base += s.restarts
            s.restarts = value

    def set_restart_state(self, slot: int, backoff_seconds: float, breaker_open: bool,
                          half_open: bool = False) -> None:
        with self._lock:
            s = self._slot(slot)
            s.backoff = float(backoff_seconds)
            s.breaker = 1.0 if breaker_open else 0.5 if half_open else 0.0

    def set_workers(self, target: int, live: int) -> None:
        with self._lock:
            self._workers = (int(target), int(live))

    def set_memory_limits(self, soft: int, hard: int) -> None:
        """The RSS limits (0: off, not exported), for alerts on RSS near a limit."""
        with self._lock:
            self._memory_limits = {k: float(v) for k, v in (("soft", soft), ("hard", hard)) if v > 0}

    def _slot(self, slot: int) -> _Slot:
        s = self._slots.get(slot)
        if s is None:
            s = self._slots[slot] = _Slot()
        return s

    def _adopt(self, slot: int, pid: int) -> _Slot | None:
        """The slot, with ``pid`` as its current worker; None if ``pid`` already exited."""
        s = self._slot(slot)
        if pid <= 0 or pid in s.exited:
            return None
        if s.pid != pid:
            if s.pid:
                self._retire(s)
            s.pid = pid
        return s

    @staticmethod
    def _retire(s: _Slot) -> None:
        for name, fam in s.live.items():
            _fold(s.base, name, fam)
        s.live = {}
        s.exited.append(s.pid)
        s.pid = 0
        s.rss = s.cpu = None

    # -- output ---------------------------------------------------------------

    def render(self) -> bytes:
        """The whole cluster in the Prometheus text format (see :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: built-in families first, then the app's."""
        with self._lock:
            return iter(self._families())

    def _families(self) -> list[Metric]:
        out: dict[str, Metric] = {n: Metric(n, h, t) for n, (t, h) in _BUILTIN.items()}
        for slot in sorted(self._slots):
            s = self._slots[slot]
            sl = str(slot)
            for name, typ, help, samples in _slot_families(s):
                metric = out.get(name)
                if metric is None:
                    try:
                        metric = out[name] = Metric(name, help, typ)
                    except ValueError:
                        continue
                if metric.type != typ:
                    continue  # old and new code disagree on a type: the lowest slot wins
                for sname, labels, value in samples:
                    lab = {"exported_slot" if k == "slot" else k: v for k, v in labels}
                    lab["slot"] = sl
                    metric.add_sample(sname, lab, value)
            one = {"slot": sl}
            if s.rss is not None:
                out[_RSS].add_sample(_RSS, one, s.rss)
            if s.cpu is not None:
                out[_CPU].add_sample(_CPU, one, s.cpu)
            if s.restarts is not None:
                out[_RESTARTS].add_sample(_RESTARTS + "_total", one, s.restarts_base + s.restarts)
            if s.backoff is not None:
                out[_BACKOFF].add_sample(_BACKOFF, one, s.backoff)
            if s.breaker is not None:
                out[_BREAKER].add_sample(_BREAKER, one, s.breaker)
        if self._workers is not None:
            target, live = self._workers
            out[_WORKERS].add_sample(_WORKERS, {"kind": "target"}, float(target))
            out[_WORKERS].add_sample(_WORKERS, {"kind": "live"}, float(live))
        for kind, limit in self._memory_limits.items():
            out[_MEMORY_LIMIT].add_sample(_MEMORY_LIMIT, {"kind": kind}, limit)
        builtin = [out.pop(n) for n in _BUILTIN]
        return builtin + [out[n] for n in sorted(out)]


def _slot_families(s: _Slot) -> Iterator[tuple[str, str, str, list[tuple[str, _Labels, float]]]]:
    """One slot's families: live counters plus base, live gauges; base alone for the rest."""
    for name in [*s.live, *(n for n in s.base if n not in s.live)]:
        live = s.live.get(name)
        base = s.base.get(name)
        if live is not None and base is not None and base.type != live.type:
            base = None
        head = live if live is not None else base
        assert head is not None
        samples: list[tuple[str, _Labels, float]] = []
        if live is not None:
            extra = base.counters if base is not None else {}
            samples.extend((k[0], k[1], v + extra.get(k, 0.0)) for k, v in live.counters.items())
            samples.extend((k[0], k[1], v) for k, v in extra.items() if k not in live.counters)
            samples.extend((k[0], k[1], v) for k, v in live.gauges.items())
        elif base is not None:
            samples.extend((k[0], k[1], v) for k, v in base.counters.items())
        help = _BUILTIN[name][1] if name in _BUILTIN else head.help
        yield name, head.type, help, samples
