"""Rolling reload: replace workers a batch at a time, never losing capacity.

For each batch, a new worker is forked into each slot while the old one keeps
serving; only when the new one has reported ready over the bus does the old
one get SIGTERM (and finish its in-flight requests). If a new worker dies or
does not report ready in time, the rollout stops: old workers that were not
replaced yet keep their slots, so a bad deploy causes no outage.

Runs in the arbiter's main thread (driven by the supervisor's tick).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Step:
    old: Any  # the arbiter's Worker being replaced (None if the slot was empty)
    new_pid: int
    started: float
    termed: bool = False


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

    def tick(self, sup: Any, server: Any, ready_pids: set[int], timeout: float) -> None:
        """Advance the rollout by whatever has happened since the last tick."""
        if not self.running:
            return
        now = time.monotonic()
        if not self.steps:
            if not self.plan:
                self.state = "done"
                self.message = f"replaced {self.done} of {self.total} workers"
                server.log.info("gunicorn-ext: rolling reload done: %s", self.message)
                return
            batch, self.plan = self.plan[: self.batch], self.plan[self.batch :]
            for slot in batch:
                old = sup.worker_in_slot(slot)
                if old is not None:
                    old.ext_retired = True
                    old.ext_rolling_old = True
                pid = sup.spawn_into(slot)
                if pid is None:
                    self._fail(sup, server, f"could not start a new worker for slot {slot}")
                    if old is not None:
                        self._restore(sup, old)
                    return
                self.steps[slot] = _Step(old, pid, now)
            return
        for slot, step in list(self.steps.items()):
            if step.termed:
                continue
            if step.new_pid in ready_pids:
                if step.old is not None:
                    step.old.ext_planned = True
                    try:
                        os.kill(step.old.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                step.termed = True
                self.done += 1
                server.log.info("gunicorn-ext: rolling reload: slot %s now served by pid %s "
                                "(%s/%s)", slot, step.new_pid, self.done, self.total)
            elif step.new_pid not in server.WORKERS:
                why = sup.exit_reason_of(step.new_pid) or "it exited before reporting ready"
                self._fail(sup, server, f"the new worker for slot {slot} (pid {step.new_pid}) "
                                        f"failed: {why}")
                return
            elif now - step.started > timeout:
                self._fail(sup, server, f"the new worker for slot {slot} (pid {step.new_pid}) did "
                                        f"not report ready within {timeout:.0f}s")
                return
        if all(s.termed for s in self.steps.values()):
            self.steps = {}
            self.tick(sup, server, ready_pids, timeout)  # start the next batch now

    def _restore(self, sup: Any, old: Any) -> None:
        old.ext_retired = False
        old.ext_rolling_old = False
        sup.hub.unretire(old)

    def _fail(self, sup: Any, server: Any, why: str) -> None:
        kept = 0
        for step in self.steps.values():
            if step.termed:
                continue
            new = server.WORKERS.get(step.new_pid)
            if new is not None:
                new.ext_retired = True
                new.ext_planned = True
                sup.hub.retire([new])
                try:
                    os.kill(step.new_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            if step.old is not None:
                self._restore(sup, step.old)
                kept += 1
        kept += len(self.plan)
        self.steps = {}
        self.plan = []
        self.state = "failed"
        self.message = (f"rollout stopped after {self.done} of {self.total}: {why}; "
                        f"{kept} old worker(s) keep serving")
        server.log.error("gunicorn-ext: rolling reload %s", self.message)
