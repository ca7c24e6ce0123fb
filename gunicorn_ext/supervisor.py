"""The primary's lifecycle manager: restart policy, recycling, rolling reload, status.

Gunicorn's arbiter respawns a dead worker at once, forever, and offers no hook
that can delay or veto a spawn. The supervisor therefore wraps three methods
of the running arbiter instance (not the class), each calling the original:

* ``spawn_worker``: picks the slot, and declines while that slot is in backoff
  or its breaker is open (Gunicorn's loop simply tries again next tick; a timer
  wakes the arbiter when the backoff ends);
* ``reap_workers``: peeks at each worker's exit status (``waitid`` with
  ``WNOWAIT``, so Gunicorn still reaps it) because ``child_exit`` is not given
  the status; and, when asked to, keeps Gunicorn from shutting down on a boot
  error;
* ``manage_workers``: runs queued operator actions (scale, rolling reload)
  in the arbiter's main thread, where forking is safe.

Everything else is plain hooks and the bus.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from .ipc.hub import Hub
from .ipc.message import Message
from .metrics import ClusterMetrics
from .reporter import EXITING, STATS
from .restart.backoff import SlotPolicy
from .restart.rolling import Rollout
from .settings import Settings

#: Request name: the instance's Prometheus text, rendered by the primary.
METRICS = "gunicorn_ext.metrics"
#: Request name: the same document as ``gunicorn-ext status --json``.
STATUS = "gunicorn_ext.status"

_BOOT_ERROR_CODES = {3: "worker failed to boot", 4: "app failed to load"}
#: A worker killed by one of these was told to stop (by the arbiter, the
#: operator or a rollout): an exit, not a crash.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class Supervisor:
    """Restart policy, recycling limits, rolling reload and status for one arbiter."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.settings = Settings()
        self.server: Any = None
        self.metrics = ClusterMetrics()
        self.rollout = Rollout()
        self.policies: dict[int, SlotPolicy] = {}
        self.last_exit: dict[int, str] = {}
        self.ready_pids: set[int] = set()
        self._statuses: dict[int, tuple[int | None, int | None]] = {}
        self._notes: dict[int, dict[str, Any]] = {}
        self._exit_reasons: dict[int, str] = {}
        self._stats: dict[int, dict[str, Any]] = {}
        self._procs: dict[int, Any] = {}
        self._sampled: dict[int, tuple[int, float]] = {}
        self._hard_kills: dict[int, float] = {}
        self._actions: collections.deque[Callable[[], None]] = collections.deque()
        self._force_slot: int | None = None
        self._pending_slot: int | None = None
        self._halt: str | None = None
        self._instance_breaker = False
        self._started = time.time()
        self.instance = os.environ.get("INSTANCE", "")
        self.control: Any = None

    # ------------------------------------------------------------------ setup

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics.set_memory_limits(settings.memory_soft_limit, settings.memory_hard_limit)
        for policy in self.policies.values():
            self._apply(policy)

    def _apply(self, p: SlotPolicy) -> None:
        s = self.settings
        p.initial, p.factor, p.cap = s.restart_delay, s.restart_backoff_factor, s.restart_max_delay
        p.stable_after = s.restart_stable_after
        p.breaker_failures, p.breaker_window = s.restart_breaker_failures, s.restart_breaker_window

    def policy(self, slot: int) -> SlotPolicy:
        p = self.policies.get(slot)
        if p is None:
            p = self.policies[slot] = SlotPolicy()
            self._apply(p)
        return p

    def install(self, server: Any) -> None:
        """Wrap the arbiter's methods and register the primary's handlers (on_starting)."""
        if self.server is server:
            return
        self.server = server
        self.instance = self.instance or os.environ.get("INSTANCE") or f"{os.uname().nodename}:{os.getpid()}"
        orig_spawn, orig_reap, orig_manage = server.spawn_worker, server.reap_workers, server.manage_workers
        server.spawn_worker = lambda: self._spawn_worker(orig_spawn)
        server.reap_workers = lambda: self._reap_workers(orig_reap)
        server.manage_workers = lambda: self._manage_workers(orig_manage)
        hub = self.hub
        hub.handler(STATS)(self._on_stats)
        hub.handler(EXITING)(self._on_exiting)
        hub.handler(METRICS)(lambda msg: self.render_metrics())
        hub.handler(STATUS)(lambda msg: self.status())
        hub.on_ready(self._on_ready)
        hub.every(self.settings.memory_check_interval, self._sample)
        if self.settings.control_socket:
            self._start_control(server)

    def _start_control(self, server: Any) -> None:
        from .control import ControlServer, socket_path

        try:
            self.control = ControlServer(socket_path(os.getpid()), self._dispatch, server.log,
                                         watch=self.hub.watch, unwatch=self.hub.unwatch)
            self.control.start()
        except Exception as exc:
            server.log.warning("gunicorn-ext: control socket not started: %s", exc)
            self.control = None
            return
        self.hub.on_child(self.control.after_fork_child)
        server.log.info("gunicorn-ext: control socket at %s", self.control.path)

    def stop(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None

    # --------------------------------------------------- arbiter method wraps

    def worker_in_slot(self, slot: int) -> Any:
        for w in list(self.server.WORKERS.values()):
            if getattr(w, "ext_slot", None) == slot and not getattr(w, "ext_retired", False):
                return w
        return None

    def spawn_into(self, slot: int) -> int | None:
        """Fork a worker into ``slot`` now (rolling reload), bypassing backoff."""
        self._force_slot = slot
        try:
            return self.server.spawn_worker()  # type: ignore[no-any-return]
        finally:
            self._force_slot = None

    def next_slot(self, server: Any) -> int | None:
        """The lowest free slot that may spawn now; None while all are held back."""
        if self._force_slot is not None:
            return self._force_slot
        if self._instance_breaker or self._halt:
            return None
        used = {getattr(w, "ext_slot", None) for w in list(server.WORKERS.values())
                if not getattr(w, "ext_retired", False)}
        now = time.monotonic()
        for slot in range(server.num_workers):
            if slot in used:
                continue
            policy = self.policy(slot)
            if policy.may_spawn(now):
                return slot
        return None

    def _spawn_worker(self, orig: Callable[[], int]) -> int | None:
        server = self.server
        slot = self.next_slot(server)
        if slot is None:
            return None
        self._pending_slot = slot
        rolling = self._force_slot is not None
        pid = orig()
        worker = server.WORKERS.get(pid)
        if worker is not None:
            worker.ext_rollout_new = rolling
        return pid

    def assign_slot(self, server: Any, worker: Any) -> int:
        """Called from pre_fork: the slot chosen by the wrapped spawn_worker."""
        slot, self._pending_slot = self._pending_slot, None
        if slot is None:  # a spawn that did not go through our wrapper
            used = {getattr(w, "ext_slot", None) for w in server.WORKERS.values()
                    if not getattr(w, "ext_retired", False)}
            slot = next(i for i in range(len(used) + 1) if i not in used)
        # Export the slot's restart counter from 0, so increase() sees its first restart.
        self.metrics.set_restarts(slot, self.policy(slot).restarts)
        worker.ext_slot = slot
        worker.ext_retired = False
        worker.ext_rolling_old = False
        worker.ext_planned = False
        worker.ext_started = time.monotonic()
        return slot

    def _reap_workers(self, orig: Callable[[], None]) -> None:
        from gunicorn.errors import HaltServer

        server = self.server
        for pid in list(server.WORKERS):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if info is None:
                continue
            if info.si_code == os.CLD_EXITED:
                self._statuses[pid] = (info.si_status, None)
            else:
                self._statuses[pid] = (None, info.si_status)
        while True:
            before = dict(server.WORKERS)
            try:
                orig()
                return
            except HaltServer as exc:
                if self.settings.halt_on_boot_error and not self.rollout.running:
                    raise
                # Gunicorn popped the worker and would shut down: keep going instead.
                for pid, worker in before.items():
                    if pid not in server.WORKERS and not getattr(worker, "ext_reaped", False):
                        server.log.error("gunicorn-ext: %s (pid %s); not shutting down (%s)",
                                         exc.reason, pid, "rolling reload in progress"
                                         if self.rollout.running else "halt_on_boot_error=False")
                        try:
                            worker.tmp.close()
                        except OSError:
                            pass
                        server.cfg.child_exit(server, worker)

    def _manage_workers(self, orig: Callable[[], None]) -> None:
        from gunicorn.errors import HaltServer

        server = self.server
        if self._halt:
            raise HaltServer(self._halt, 1)
        while self._actions:
            action = self._actions.popleft()
            try:
                action()
            except Exception:
                server.log.exception("gunicorn-ext: operator action failed")
        self.rollout.tick(self, server, self.ready_pids, self.settings.reload_ready_timeout)
        extra = sum(1 for w in list(server.WORKERS.values()) if getattr(w, "ext_rolling_old", False))
        if not extra:
            orig()
            return
        # Old workers of a rollout stay until their replacement is ready: don't
        # let Gunicorn count them against num_workers and stop someone else.
        server._num_workers += extra
        try:
            orig()
        finally:
            server._num_workers -= extra

    # ------------------------------------------------------------------ exits

    def worker_exited(self, server: Any, worker: Any) -> None:
        """child_exit: account for the exit, choose the backoff, maybe open the breaker."""
        worker.ext_reaped = True
        pid = worker.pid
        slot = getattr(worker, "ext_slot", None)
        was_ready = pid in self.ready_pids
        self.ready_pids.discard(pid)
        self._stats.pop(pid, None)
        self._procs.pop(pid, None)
        self._sampled.pop(pid, None)
        self._hard_kills.pop(pid, None)
        if slot is None:
            return
        self.metrics.worker_exited(slot, pid)
        code, sig = self._statuses.pop(pid, (None, None))
        note = self._notes.pop(pid, None)
        reason = self._describe(worker, code, sig, note)
        self._exit_reasons[pid] = reason
        if len(self._exit_reasons) > 1000:
            self._exit_reasons.pop(next(iter(self._exit_reasons)))
        if getattr(worker, "ext_retired", False):
            return  # a replaced worker: its slot already has a successor
        if getattr(worker, "ext_rollout_new", False) and not was_ready:
            return  # the rollout stops and gives the slot back to the old worker
        planned = bool(getattr(worker, "ext_planned", False) or code == 0
                       or sig in _STOP_SIGNALS  # someone asked it to stop
                       or not server.LISTENERS  # the arbiter is shutting down
                       or (note is not None and note.get("planned")))
        uptime = time.monotonic() - getattr(worker, "ext_started", time.monotonic())
        self.last_exit[slot] = reason
        policy = self.policy(slot)
        opened = policy.exited(time.monotonic(), uptime, crashed=not planned)
        self.metrics.set_restarts(slot, policy.restarts)
        if planned:
            server.log.info("gunicorn-ext: worker slot %s (pid %s) exited: %s", slot, pid, reason)
        elif opened:
            self._open_breaker(server, slot, policy, reason, note)
        else:
            server.log.warning(
                "gunicorn-ext: worker slot %s (pid %s) crashed after %.1fs: %s; respawning in %.2fs",
                slot, pid, uptime, reason, policy.delay)
        self.metrics.set_restart_state(slot, policy.backoff_left(time.monotonic()), policy.breaker_open)
        if policy.delay and not policy.breaker_open:
            self.hub.call_later(policy.delay + 0.01, server.wakeup)

    def _open_breaker(self, server: Any, slot: int, policy: SlotPolicy, reason: str,
                      note: dict[str, Any] | None) -> None:
        s = self.settings
        scope = "any slot" if s.restart_breaker_scope == "instance" else f"slot {slot}"
        tb = (note or {}).get("traceback")
        what = (f"gunicorn-ext: restart breaker open: slot {slot} crashed {len(policy._recent)} "
                f"times in {s.restart_breaker_window:.0f}s, last cause: {reason}. Not respawning "
                f"{scope}; ")
        what += ("shutting down (restart_breaker_action='exit')." if s.restart_breaker_action == "exit"
                 else "fix the app, then run `gunicorn-ext reload --rolling` or `gunicorn-ext scale N`.")
        if tb:
            what += "\nLast traceback from the worker:\n" + tb.rstrip()
        server.log.error(what)
        if s.restart_breaker_scope == "instance":
            self._instance_breaker = True
        if s.restart_breaker_action == "exit":
            self._halt = f"restart breaker open for slot {slot}: {reason}"
            server.wakeup()

    def _describe(self, worker: Any, code: int | None, sig: int | None,
                  note: dict[str, Any] | None) -> str:
        forced = getattr(worker, "ext_exit_reason", None)
        if forced:
            return str(forced)
        if getattr(worker, "aborted", False):
            return f"timed out (no heartbeat for {self.server.timeout}s), killed by the arbiter"
        if note is not None and note.get("reason"):
            return str(note["reason"])
        if sig is not None:
            return f"killed by {_signame(sig)}"
        if code is not None:
            if code in _BOOT_ERROR_CODES:
                return f"exit code {code} ({_BOOT_ERROR_CODES[code]})"
            return f"exit code {code}"
        return "exited"

    def exit_reason_of(self, pid: int) -> str | None:
        return self._exit_reasons.get(pid)

    # ----------------------------------------------------- bus handlers (hub)

    def _on_stats(self, msg: Message) -> None:
        snap = msg.payload
        if not isinstance(snap, dict) or msg.src < 0:
            return
        pid = snap.get("pid")
        if not isinstance(pid, int):
            return
        self._stats[pid] = snap
        self.metrics.update(msg.src, pid, snap)

    def _on_exiting(self, msg: Message) -> None:
        note = msg.payload
        if isinstance(note, dict) and isinstance(note.get("pid"), int):
            self._notes[note["pid"]] = note

    def _on_ready(self, slot: int, pid: int) -> None:
        self.ready_pids.add(pid)
        if self.rollout.running and self.server is not None:
            self.server.wakeup()

    # --------------------------------------------------------- sampling (hub)

    def _sample(self) -> None:
        """Per-worker RSS and CPU (psutil); enforce the hard memory limit."""
        import psutil

        server = self.server
        if server is None:
            return
        s = self.settings
        now = time.monotonic()
        live = set()
        for w in list(server.WORKERS.values()):
            pid = w.pid
            live.add(pid)
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                    proc.cpu_percent(None)
                rss = int(proc.memory_info().rss)
                cpu = float(proc.cpu_percent(None))
            except (psutil.Error, OSError):
                continue
            self._sampled[pid] = (rss, cpu)
            slot = getattr(w, "ext_slot", None)
            if slot is not None:
                self.metrics.set_process(slot, pid, rss, cpu)
            if s.memory_hard_limit and rss > s.memory_hard_limit:
                first = self._hard_kills.get(pid)
                if first is None:
                    self._hard_kills[pid] = now
                    w.ext_exit_reason = (f"stopped by the primary: RSS {rss >> 20} MiB over "
                                         f"memory_hard_limit {s.memory_hard_limit >> 20} MiB")
                    w.ext_planned = True
                    server.log.warning("gunicorn-ext: worker slot %s (pid %s) %s; TERM now, KILL "
                                       "in %.0fs", slot, pid, w.ext_exit_reason, s.memory_hard_grace)
                    self._kill(pid, signal.SIGTERM)
                elif now - first > s.memory_hard_grace:
                    server.log.error("gunicorn-ext: worker slot %s (pid %s) still over "
                                     "memory_hard_limit after %.0fs: KILL", slot, pid, now - first)
                    self._kill(pid, signal.SIGKILL)
                    self._hard_kills[pid] = float("inf")
        for pid in list(self._procs):
            if pid not in live:
                self._procs.pop(pid, None)
        target = server.num_workers
        self.metrics.set_workers(target, len(live))
        for slot, policy in list(self.policies.items()):
            self.metrics.set_restart_state(slot, policy.backoff_left(now), policy.breaker_open)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # --------------------------------------------------------- status (hub)

    def status(self) -> dict[str, Any]:
        server = self.server
        if server is None:
            return {"error": "the primary is not running"}
        now = time.monotonic()
        rows = []
        seen = set()
        for w in sorted(list(server.WORKERS.values()), key=lambda w: (getattr(w, "ext_slot", 0), w.age)):
            slot = getattr(w, "ext_slot", None)
            pid = w.pid
            retired = getattr(w, "ext_retired", False)
            if not retired:
                seen.add(slot)
            stats = self._stats.get(pid, {})
            rss, cpu = self._sampled.get(pid, (int(stats.get("rss", 0) or 0), 0.0))
            policy = self.policies.get(slot) if slot is not None else None
            rows.append({
                "slot": slot,
                "pid": pid,
                "state": "draining" if retired else ("ready" if pid in self.ready_pids else "booting"),
                "uptime": round(now - getattr(w, "ext_started", now), 3),
                "requests": int(stats.get("requests", 0) or 0),
                "inflight": int(stats.get("inflight", 0) or 0),
                "rss": rss,
                "cpu": round(cpu, 1),
                "restarts": policy.restarts if policy else 0,
                "last_exit": self.last_exit.get(slot) if slot is not None else None,
            })
        for slot in range(server.num_workers):
            if slot in seen:
                continue
            policy = self.policies.get(slot) or SlotPolicy()  # never written from this thread
            state = "stopped" if policy.breaker_open or self._instance_breaker else "backoff"
            rows.append({"slot": slot, "pid": None, "state": state, "uptime": 0.0, "requests": 0,
                         "inflight": 0, "rss": 0, "cpu": 0.0, "restarts": policy.restarts,
                         "last_exit": self.last_exit.get(slot),
                         "backoff": round(policy.backoff_left(now), 3)})
        rows.sort(key=lambda r: (r["slot"] if r["slot"] is not None else -1, r["state"] == "draining"))
        totals = {k: sum(int(r[k] or 0) for r in rows) for k in ("requests", "inflight", "rss")}
        totals["restarts"] = sum(p.restarts for p in list(self.policies.values()))
        return {
            "instance": self.instance,
            "primary_pid": os.getpid(),
            "uptime": round(time.time() - self._started, 3),
            "workers_target": server.num_workers,
            "workers": rows,
            "totals": totals,
            "rollout": self.rollout.as_dict(),
        }

    def render_metrics(self) -> str:
        return self.metrics.render().decode()

    # ------------------------------------------------------- control (hub)

    def _dispatch(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return self.status()
        if cmd == "reload":
            batch = args.get("batch") or self.settings.reload_batch
            if not isinstance(batch, int) or batch < 1:
                return {"error": f"batch must be a whole number >= 1, got {batch!r}"}
            if self.rollout.running:
                return {"error": "a rolling reload is already running: " + self.rollout.message}
            if self._halt:
                return {"error": "the instance is shutting down"}
            self.rollout.state = "running"  # visible at once; the main thread fills it in
            self.rollout.message = "starting"
            self.rollout.done = 0
            self._queue(lambda: self._start_rollout(batch))
            return {"ok": True, "rollout": self.rollout.as_dict()}
        if cmd == "scale":
            n = args.get("workers")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                return {"error": f"workers must be a whole number >= 1, got {n!r}"}
            self._queue(lambda: self._scale(n))
            return {"ok": True, "workers": n}
        return {"error": f"unknown command {cmd!r}; known: status, reload, scale"}

    def _queue(self, action: Callable[[], None]) -> None:
        self._actions.append(action)
        self.server.wakeup()

    def _start_rollout(self, batch: int) -> None:
        for p in list(self.policies.values()):
            p.reset()
        self._instance_breaker = False
        slots = sorted({w.ext_slot for w in self.server.WORKERS.values()
                        if not getattr(w, "ext_retired", False)})
        self.rollout.start(slots, batch)
        self.server.log.info("gunicorn-ext: rolling reload: %s", self.rollout.message)

    def _scale(self, n: int) -> None:
        for p in list(self.policies.values()):
            p.reset()
        self._instance_breaker = False
        self.server.log.info("gunicorn-ext: scaling from %s to %s workers", self.server.num_workers, n)
        self.server.num_workers = n


__all__ = ["Supervisor", "METRICS", "STATUS"]
