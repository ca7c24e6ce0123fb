"""Rolling reload: replace workers a batch at a time, never losing capacity.

For each batch, a new worker is forked into each slot while the old one keeps
serving; only when the new one has reported ready over the bus does the old
one get SIGTERM (and finish its in-flight requests). If a new worker dies or
does not report ready in time, the rollout stops: old workers that were not
replaced yet keep their slots, so a bad deploy causes no outage.

Runs in the arbiter's main thread (driven by the supervisor's tick).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..worker_record import WorkerRecord


class RolloutHost(Protocol):
    """What a rollout asks of the supervisor (supervisor.py implements it)."""

    def worker_in_slot(self, slot: int) -> WorkerRecord | None:
        """The worker holding ``slot`` now, if any."""

    def spawn_into(self, slot: int) -> WorkerRecord | None:
        """Fork a worker into ``slot`` now, bypassing backoff; None if it can't."""

    def running(self, rec: WorkerRecord) -> bool:
        """Whether the arbiter still has the worker (not reaped)."""

    def retire(self, rec: WorkerRecord, rolling_old: bool = False) -> None:
        """Free ``rec``'s slot for a successor; ``rolling_old``: it keeps serving (and its
        bus messages) until the successor is ready."""

    def unretire(self, rec: WorkerRecord) -> None:
        """Give ``rec`` its slot back (a stopped rollout)."""

    def terminate(self, rec: WorkerRecord) -> None:
        """SIGTERM the worker, as a planned exit (it finishes its in-flight requests)."""


@dataclass
class _Step:
    old: WorkerRecord | None  # the worker being replaced (None if the slot was empty)
    new: WorkerRecord
    started: float
    termed: bool = False

    @property
    def new_pid(self) -> int | None:
        return self.new.pid


@dataclass
class Rollout:
    state: str = "idle"  # idle | running | done | failed
    batch: int = 1
    done: int = 0
    total: int = 0
    message: str = ""
    plan: list[int] = field(default_factory=list)
    steps: dict[int, _Step] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "batch": self.batch, "done": self.done, "total": self.total,
                "message": self.message}

    def start(self, slots: list[int], batch: int) -> None:
        self.state = "running"
        self.batch = batch
        self.done = 0
        self.total = len(slots)
        self.plan = sorted(slots)
        self.steps = {}
        self.message = f"replacing {self.total} workers, {batch} at a time"

    def tick(self, host: RolloutHost, log: Any, timeout: float, now: float) -> None:
        """Advance the rollout by whatever has happened since the last tick (``now``:
        monotonic time)."""
        if not self.running:
            return
        if not self.steps:
            if not self.plan:
                self.state = "done"
                self.message = f"replaced {self.done} of {self.total} workers"
                log.info("gunicorn-ext: rolling reload done: %s", self.message)
                return
            batch, self.plan = self.plan[: self.batch], self.plan[self.batch :]
            for slot in batch:
                old = host.worker_in_slot(slot)
                if old is not None:
                    host.retire(old, rolling_old=True)
                new = host.spawn_into(slot)
                if new is None:
                    self._fail(host, log, f"could not start a new worker for slot {slot}")
                    if old is not None:
                        host.unretire(old)
                    return
                self.steps[slot] = _Step(old, new, now)
            return
        for slot, step in list(self.steps.items()):
            if step.termed:
                continue
            if step.new.ready:
                if step.old is not None:
                    host.terminate(step.old)
                step.termed = True
                self.done += 1
                log.info("gunicorn-ext: rolling reload: slot %s now served by pid %s "
                         "(%s/%s)", slot, step.new_pid, self.done, self.total)
            elif not host.running(step.new):
                why = step.new.exit_reason or "it exited before reporting ready"
                self._fail(host, log, f"the new worker for slot {slot} (pid {step.new_pid}) "
                                      f"failed: {why}")
                return
            elif now - step.started > timeout:
                self._fail(host, log, f"the new worker for slot {slot} (pid {step.new_pid}) did "
                                      f"not report ready within {timeout:.0f}s")
                return
        if all(s.termed for s in self.steps.values()):
            self.steps = {}
            self.tick(host, log, timeout, now)  # start the next batch now

    def _fail(self, host: RolloutHost, log: Any, why: str) -> None:
        kept = 0
        for step in self.steps.values():
            if step.termed:
                continue
            if host.running(step.new):
                host.retire(step.new)
                host.terminate(step.new)
            if step.old is not None:
                host.unretire(step.old)
                kept += 1
        kept += len(self.plan)
        self.steps = {}
        self.plan = []
        self.state = "failed"
        self.message = (f"rollout stopped after {self.done} of {self.total}: {why}; "
                        f"{kept} old worker(s) keep serving")
        log.error("gunicorn-ext: rolling reload %s", self.message)
