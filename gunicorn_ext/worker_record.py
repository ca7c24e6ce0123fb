"""The supervisor's record of each worker: slot, generation, state, timestamps, exit, stats.

One :class:`WorkerRecord` per worker, created in ``pre_fork`` (when the slot is
chosen) and dropped in one place, :meth:`WorkerTable.drop` (``child_exit``). The
Gunicorn Worker object only gets one reference to it (gunicorn_internals.py), so
a worker's state never leaks past its exit and Gunicorn's objects stay Gunicorn's.

Written in the arbiter's main thread (spawn, exit, flags) and in the hub's thread
(readiness, stats, exit notes, samples); each field has one writer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from . import gunicorn_internals as gi
from .control import pid_alive

BOOTING, READY, DRAINING, EXITED = "booting", "ready", "draining", "exited"


@dataclass(eq=False)
class WorkerRecord:
    """One worker, from ``pre_fork`` to ``child_exit``."""

    #: The slot it serves (0..workers-1); a replacement takes the dead worker's slot.
    slot: int
    #: 1 for the first worker of the slot, then one more for each worker after it.
    generation: int
    #: Gunicorn's Worker object.
    worker: Any
    #: Monotonic time of the spawn.
    started: float
    #: Set once fork() returned in the arbiter.
    pid: int | None = None
    #: Forked by a rolling reload (its slot's old worker serves until it is ready).
    rollout_new: bool = False
    #: Replaced: its slot has (or is getting) a successor; its exit is not the slot's.
    retired: bool = False
    #: Retired by a rolling reload and still serving until its successor is ready.
    rolling_old: bool = False
    #: Told to stop (by the primary or a rollout): its exit is not a crash.
    planned: bool = False
    #: Why the primary stopped it (becomes the exit reason).
    stop_reason: str | None = None
    #: Monotonic time it reported ready over the bus.
    ready_at: float | None = None
    #: ``(exit code, None)`` or ``(None, signal)``, peeked at before Gunicorn reaps it.
    exit_status: tuple[int | None, int | None] | None = None
    #: The worker's own note of why it exits (the reporter's EXITING message).
    exit_note: dict[str, Any] | None = None
    #: The exit reason, as status and logs show it (set at the exit).
    exit_reason: str | None = None
    #: The last stats snapshot the worker reported.
    stats: dict[str, Any] = field(default_factory=dict)
    #: psutil.Process of the worker (the primary's sampler).
    proc: Any = None
    #: ``(rss, cpu %)`` of the last sample.
    sampled: tuple[int, float] | None = None
    #: Monotonic time of the primary's TERM over memory_hard_limit (inf once KILLed).
    hard_kill_at: float | None = None
    #: Set when the record is dropped (the worker was reaped).
    exited: bool = False

    @property
    def state(self) -> str:
        """``booting``, ``ready``, ``draining`` (retired) or ``exited``."""
        if self.exited:
            return EXITED
        if self.retired:
            return DRAINING
        return READY if self.ready_at is not None else BOOTING

    @property
    def ready(self) -> bool:
        """It reported ready and has not exited."""
        return self.ready_at is not None and not self.exited


class WorkerTable:
    """The records of the arbiter's workers, by pid."""

    def __init__(self) -> None:
        self._by_pid: dict[int, WorkerRecord] = {}
        #: Created in pre_fork, pid not known yet (at most one: forks are one at a time).
        self._forking: WorkerRecord | None = None
        self._generations: dict[int, int] = {}
        self._lock = threading.Lock()  # the hub's thread may key a fork's record too

    def spawned(self, slot: int, worker: Any, now: float, rollout_new: bool = False) -> WorkerRecord:
        """``pre_fork``: the record of the worker about to be forked into ``slot``."""
        generation = self._generations.get(slot, 0) + 1
        self._generations[slot] = generation
        rec = WorkerRecord(slot, generation, worker, now, rollout_new=rollout_new)
        gi.attach(worker, rec)
        with self._lock:
            self._forking = rec
        return rec

    def forked(self) -> WorkerRecord | None:
        """fork() returned in the arbiter: key the new record by its pid."""
        with self._lock:
            rec = self._forking
            if rec is not None and isinstance(rec.worker.pid, int):
                self._forking = None
                rec.pid = rec.worker.pid
                self._by_pid[rec.pid] = rec
        return rec

    def get(self, pid: int) -> WorkerRecord | None:
        rec = self._by_pid.get(pid)
        if rec is None and self._forking is not None and self._forking.worker.pid == pid:
            rec = self.forked()  # a fork that did not go through the spawn wrapper
        return rec

    def find(self, pid: int, slot: int) -> WorkerRecord | None:
        """By pid; from the hub, also the one being forked into ``slot`` (a worker
        can speak before fork() has returned in the arbiter), unless ``pid`` is gone:
        then it is the slot's reaped worker, whose late words are not its successor's."""
        rec = self.get(pid)
        forking = self._forking
        if rec is None and forking is not None and forking.slot == slot and pid_alive(pid):
            rec = forking
        return rec

    @staticmethod
    def of(worker: Any) -> WorkerRecord | None:
        """The record of a Gunicorn Worker (also in the worker process)."""
        rec = gi.attached(worker)
        return rec if isinstance(rec, WorkerRecord) else None

    def drop(self, rec: WorkerRecord) -> None:
        """The worker was reaped (``child_exit``): the one place a record goes."""
        with self._lock:
            rec.exited = True
            rec.proc = None
            if rec.pid is not None:
                self._by_pid.pop(rec.pid, None)
            if self._forking is rec:
                self._forking = None

    def live(self) -> list[WorkerRecord]:
        """Every forked, not yet reaped worker's record, oldest first."""
        forking = self._forking
        if forking is not None and isinstance(forking.worker.pid, int):
            self.forked()  # a fork that did not go through the spawn wrapper
        with self._lock:
            return list(self._by_pid.values())

    def in_slot(self, slot: int) -> WorkerRecord | None:
        """The worker that holds ``slot`` (not retired), if any."""
        for rec in self.live():
            if rec.slot == slot and not rec.retired:
                return rec
        return None

    def used_slots(self) -> set[int]:
        return {rec.slot for rec in self.live() if not rec.retired}

    def __len__(self) -> int:
        return len(self._by_pid)


def slot_of(worker: Any, default: Any = None) -> Any:
    """The slot of a Gunicorn Worker (in the arbiter or in the worker itself)."""
    rec = WorkerTable.of(worker)
    return rec.slot if rec is not None else default


__all__ = ["WorkerRecord", "WorkerTable", "slot_of", "BOOTING", "READY", "DRAINING", "EXITED"]
