"""The primary's lifecycle manager: restart policy, recycling, rolling reload, status.

Gunicorn's arbiter respawns a dead worker at once, forever, and offers no hook
that can delay or veto a spawn. The supervisor therefore wraps five methods
of the running arbiter instance (not the class), each calling the original
(through gunicorn_internals.py, the one module that touches Gunicorn's
internals; each worker's state is its record, worker_record.py):

* ``spawn_worker``: picks the slot, and declines while that slot is in backoff
  or its breaker is open (Gunicorn's loop simply tries again next tick; a timer
  wakes the arbiter when the backoff ends); it also makes the listeners listen
  again before the fork when they were stopped (restart/gate.py);
* ``reap_workers``: peeks at each worker's exit status (``waitid`` with
  ``WNOWAIT``, so Gunicorn still reaps it) because ``child_exit`` is not given
  the status; and, when asked to, keeps Gunicorn from shutting down on a boot
  error;
* ``manage_workers``: runs queued operator actions (scale, rolling reload)
  in the arbiter's main thread, where forking is safe, closes a half-open
  breaker whose worker stayed up, and stops the listeners when no worker runs
  and none may start now, so clients are refused instead of kept waiting;
* ``stop``: notes that the arbiter is shutting down (so its workers' exits are
  not crashes) and puts a renamed unix socket back first, so Gunicorn closes
  and unlinks exactly what it opened; on a graceful stop with even spread, it
  first has the dispatcher take every connection queued in the listen backlog
  and stop the listeners, and waits (up to ``graceful_timeout``) until workers
  have accepted them, so Gunicorn's TERM loses none (Gunicorn #3397);
* ``handle_hup`` (with ``hup="rolling"``): re-reads the config with Gunicorn's
  own ``app.reload()`` and ``setup()`` (its ``reload()`` minus the spawn-all/
  kill-all part), refuses a config that changes a restart-only setting
  (restart/hup.py), then starts a rolling reload.

Everything else is plain hooks and the bus. :class:`Supervisor` is also the
:class:`~gunicorn_ext.restart.rolling.RolloutHost` a rolling reload drives.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from . import gunicorn_internals as gi
from .ipc.hub import Hub
from .ipc.message import Message
from .metrics import ClusterMetrics
from .reporter import EXITING, STATS
from .restart.backoff import SlotPolicy
from .restart.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from .restart.gate import Gate, refuse_new, wait_stopped_accepting
from .restart.hup import restart_only_changes
from .restart.rolling import Rollout
from .settings import Settings
from .worker_record import WorkerRecord, WorkerTable

#: Request name: the instance's Prometheus text, rendered by the primary.
METRICS = "gunicorn_ext.metrics"
#: Request name: the same document as ``gunicorn-ext status --json``.
STATUS = "gunicorn_ext.status"

#: Graceful stop without even spread: how long TERMed workers get at most to stop
#: accepting (gevent and asyncio workers look once a second) before the listeners
#: refuse new connections.
_STOP_ACCEPT_WAIT = 3.0
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
        self.server: Any = None  # the arbiter, once installed (a gi.GunicornArbiter)
        self.metrics = ClusterMetrics()
        self.rollout = Rollout()
        self.policies: dict[int, SlotPolicy] = {}
        #: One breaker per slot (restart_breaker_scope="slot"), or one for all.
        self.breakers: dict[int, Breaker] = {}
        self.instance_breaker = Breaker()
        self.gate = Gate()
        #: One record per worker, from pre_fork to child_exit.
        self.workers = WorkerTable()
        #: The last exit reason of each slot (status' ``last_exit``).
        self.last_exit: dict[int, str] = {}
        self._actions: collections.deque[Callable[[], None]] = collections.deque()
        self._force_slot: int | None = None
        self._pending_slot: int | None = None
        self._halt: str | None = None
        self._stopping = False
        self._started = time.time()
        #: The monotonic clock of backoff, breaker, uptime and rollout deadlines.
        self.clock: Callable[[], float] = time.monotonic
        self.instance = os.environ.get("INSTANCE", "")
        self.control: Any = None
        #: The dispatcher (even spread), drained on a graceful stop; None when off.
        self.dispatcher: Any = None
        #: True while a rolling HUP runs the config's on_reload hook (hooks.py's own
        #: on_reload, which retires every worker for Gunicorn's HUP, then does nothing).
        self.hup_rolling = False
        self._configured = 0

    # ------------------------------------------------------------------ setup

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self._configured += 1
        self.metrics.set_memory_limits(settings.memory_soft_limit, settings.memory_hard_limit)
        for policy in self.policies.values():
            self._apply(policy)
        for b in [self.instance_breaker, *self.breakers.values()]:
            self._apply_breaker(b)

    def _apply(self, p: SlotPolicy) -> None:
        s = self.settings
        p.initial, p.factor, p.cap = s.restart_delay, s.restart_backoff_factor, s.restart_max_delay
        p.stable_after = s.restart_stable_after

    def _apply_breaker(self, b: Breaker) -> None:
        s = self.settings
        b.failures, b.window = s.restart_breaker_failures, s.restart_breaker_window
        b.cooldown, b.max_cooldown = s.restart_breaker_cooldown, s.restart_breaker_max_cooldown

    def policy(self, slot: int) -> SlotPolicy:
        p = self.policies.get(slot)
        if p is None:
            p = self.policies[slot] = SlotPolicy()
            self._apply(p)
        return p

    def breaker(self, slot: int) -> Breaker:
        """The breaker that governs ``slot`` (the instance's one with scope "instance")."""
        if self.settings.restart_breaker_scope == "instance":
            return self.instance_breaker
        b = self.breakers.get(slot)
        if b is None:
            b = self.breakers[slot] = Breaker()
            self._apply_breaker(b)
        return b

    def _all_breakers(self) -> list[tuple[int | None, Breaker]]:
        if self.settings.restart_breaker_scope == "instance":
            return [(None, self.instance_breaker)]
        return list(self.breakers.items())

    def install(self, server: gi.GunicornArbiter) -> None:
        """Wrap the arbiter's methods and register the primary's handlers (on_starting)."""
        if self.server is server:
            return
        gi.wrap_arbiter(server, spawn_worker=self._spawn_worker, reap_workers=self._reap_workers,
                        manage_workers=self._manage_workers,
                        stop=lambda orig, graceful=True: self._stop(orig, graceful),
                        handle_hup=self._handle_hup)
        self.server = server
        self.instance = self.instance or os.environ.get("INSTANCE") or f"{os.uname().nodename}:{os.getpid()}"
        hub = self.hub
        hub.handler(STATS)(self._on_stats)
        hub.handler(EXITING)(self._on_exiting)
        hub.handler(METRICS)(lambda msg: self.render_metrics())
        hub.handler(STATUS)(lambda msg: self.status())
        hub.on_ready(self._on_ready)
        hub.every(self.settings.memory_check_interval, self._sample)
        if self.settings.control_socket:
            self._start_control(server)

    def _start_control(self, server: gi.GunicornArbiter) -> None:
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

    # RolloutHost (restart/rolling.py): what a rolling reload asks, main thread

    def worker_in_slot(self, slot: int) -> WorkerRecord | None:
        return self.workers.in_slot(slot)

    def spawn_into(self, slot: int) -> WorkerRecord | None:
        """Fork a worker into ``slot`` now (rolling reload), bypassing backoff."""
        self._force_slot = slot
        try:
            pid = self.server.spawn_worker()
        finally:
            self._force_slot = None
        return self.workers.get(pid) if pid is not None else None

    def running(self, rec: WorkerRecord) -> bool:
        return rec.pid is not None and gi.worker_for(self.server, rec.pid) is not None

    def retire(self, rec: WorkerRecord, rolling_old: bool = False) -> None:
        rec.retired = True
        rec.rolling_old = rolling_old
        if not rolling_old:
            self.hub.retire([rec.worker])

    def unretire(self, rec: WorkerRecord) -> None:
        rec.retired = False
        rec.rolling_old = False
        self.hub.unretire(rec.worker)

    def terminate(self, rec: WorkerRecord) -> None:
        rec.planned = True
        if rec.pid is not None:
            self._kill(rec.pid, signal.SIGTERM)

    # the slots

    def next_slot(self, server: gi.GunicornArbiter) -> int | None:
        """The lowest free slot that may spawn now; None while all are held back."""
        if self._force_slot is not None:
            return self._force_slot
        if self._halt:
            return None
        used = self.workers.used_slots()
        now = self.clock()
        for slot in range(server.num_workers):
            if slot in used:
                continue
            b = self.breaker(slot)
            if b.due(now):
                b.half_open()
                server.log.warning(
                    "gunicorn-ext: restart breaker half-open after a %gs cool-down: trying one "
                    "worker in slot %s", b.wait, slot)
            if b.state == HALF_OPEN:
                if b.may_spawn(now):
                    return slot  # the probe: the cool-down was its backoff
                continue
            if b.may_spawn(now) and self.policy(slot).may_spawn(now):
                return slot
        return None

    def _held_because(self) -> str:
        """Why nothing may start now (for the log line of a closed gate)."""
        if any(b.state != CLOSED for _, b in self._all_breakers()):
            return "held by the restart breaker"
        return "every slot in restart backoff"

    def _spawn_worker(self, orig: Callable[[], int]) -> int | None:
        server = self.server
        slot = self.next_slot(server)
        if slot is None:
            return None
        if not self.gate.open(gi.listeners(server), server.log):
            return None  # a worker must never inherit a listener that does not listen
        self._pending_slot = slot
        rolling = self._force_slot is not None
        pid = orig()
        self.workers.forked()
        b = self.breaker(slot)
        if b.state == HALF_OPEN and b.probe_pid is None and not rolling:
            b.probe_pid = pid
        return pid

    def _stop(self, orig: Callable[[bool], None], graceful: bool) -> None:
        server = self.server
        self._stopping = True  # exits from here on are the shutdown's, not crashes
        self.gate.release(server.log)
        # After USR2 the other master holds the same listening sockets: shutting them down
        # would stop it listening too, so the old generation only closes its copies.
        shared = gi.shares_listeners(server)
        if graceful and gi.listeners(server) and gi.workers(server) and not shared:
            if self.dispatcher is not None:
                self._drain_backlog(server)
            else:
                # The workers accept themselves: TERM them first (Gunicorn's TERM below is
                # then a no-op for them), wait until they stopped accepting (a listener
                # shut down under a worker's accept fails it), then refuse new clients
                # instead of leaving them queued.
                server.kill_workers(signal.SIGTERM)
                wait_stopped_accepting(server.worker_class.__name__, gi.listeners(server),
                                       [w.pid for w in gi.workers(server)],
                                       min(_STOP_ACCEPT_WAIT, float(server.cfg.graceful_timeout)))
                refuse_new(gi.listeners(server), server.log)
        orig(graceful)

    def _drain_backlog(self, server: gi.GunicornArbiter) -> None:
        """Before Gunicorn closes the listeners and TERMs the workers: the dispatcher
        takes what is queued and stops listening (new clients are refused), then hands
        the held connections out; wait until workers have them all, or graceful_timeout."""
        deadline = time.monotonic() + server.cfg.graceful_timeout
        held = self.dispatcher.drain(gi.listeners(server),
                                     timeout=max(1.0, deadline - time.monotonic()))
        while not self.dispatcher.drained() and time.monotonic() < deadline and gi.workers(server):
            server.reap_workers()
            time.sleep(0.01)
        left = self.dispatcher.undelivered()
        if left:
            server.log.warning("gunicorn-ext: graceful stop: %s queued connection(s) not handed to "
                               "a worker within graceful_timeout (%ss)", left,
                               server.cfg.graceful_timeout)
        else:
            server.log.info("gunicorn-ext: graceful stop: not listening any more; the %s "
                            "connection(s) queued in the backlog went to workers", held)

    # ------------------------------------------------------------ rolling HUP

    def _handle_hup(self, orig: Callable[[], None]) -> None:
        if self.settings.hup != "rolling":
            orig()
            return
        server = self.server
        server.log.info("gunicorn-ext: SIGHUP: re-reading the config, then a rolling reload "
                        "(hup='rolling')")
        if self.rollout.running:
            server.log.error("gunicorn-ext: SIGHUP refused: a rolling reload is already running "
                             "(%s); send it again when that one is done", self.rollout.message)
            return
        if self._halt or self._stopping:
            return
        why = self._reread_config(server)
        if why:
            server.log.error("gunicorn-ext: SIGHUP refused: %s; the config in use is unchanged "
                             "and the old workers keep serving", why)
            return
        gi.forward_hup_to_dirty_arbiter(server)
        self._reset_restarts()
        self._start_rollout(self.settings.reload_batch)

    def _reread_config(self, server: gi.GunicornArbiter) -> str | None:
        """Gunicorn's Arbiter.reload() up to the spawning: the new config, or why not.

        Uses the arbiter's ``app.reload()`` (which runs the config file again, so its
        ``gunicorn_ext.enable()`` reconfigures this supervisor) and ``setup()``. On a
        refusal everything is put back as it was.
        """
        old_cfg, old_settings, old_env = server.cfg, self.settings, dict(os.environ)
        old_frame = (self.hub.max_frame, self.hub.max_backlog)
        configured = self._configured
        gi.reset_environment(old_cfg)
        why = gi.reread_config(server)
        new_cfg = gi.new_config(server)
        if why is None and self._configured == configured:
            why = "the re-read config does not call gunicorn_ext.enable()"
        if why is None:
            changes = restart_only_changes(old_cfg, new_cfg, old_settings, self.settings)
            if changes:
                why = "these settings need a restart: " + "; ".join(changes)
        if why is not None:
            gi.keep_config(server, old_cfg)
            os.environ.clear()
            os.environ.update(old_env)
            if self.settings is not old_settings:
                self.configure(old_settings)
            self.hub.max_frame, self.hub.max_backlog = old_frame
            return why
        gi.apply_config(server)
        self.hup_rolling = True
        try:
            gi.run_on_reload(server)
        finally:
            self.hup_rolling = False
        gi.renew_pidfile(server)
        server.log.info("gunicorn-ext: SIGHUP: config re-read (%s workers, reload_batch %s)",
                        server.num_workers, self.settings.reload_batch)
        return None

    def assign_slot(self, server: gi.GunicornArbiter, worker: Any) -> int:
        """Called from pre_fork: the slot chosen by the wrapped spawn_worker."""
        slot, self._pending_slot = self._pending_slot, None
        if slot is None:  # a spawn that did not go through our wrapper
            used = self.workers.used_slots()
            slot = next(i for i in range(len(used) + 1) if i not in used)
        # Export the slot's restart counter from 0, so increase() sees its first restart.
        self.metrics.set_restarts(slot, self.policy(slot).restarts)
        self.workers.spawned(slot, worker, self.clock(), rollout_new=self._force_slot is not None)
        return slot

    def retire_all(self, server: gi.GunicornArbiter) -> None:
        """Gunicorn's HUP (on_reload): every running worker is about to be replaced."""
        old = gi.workers(server)
        for w in old:
            rec = self.workers.of(w)
            if rec is not None:
                rec.retired = True
        self.hub.retire(old)

    def scale_down(self, server: gi.GunicornArbiter, new: int) -> None:
        """nworkers_changed to fewer: make Gunicorn stop the highest slots, keeping 0..N-1."""
        live = [rec for rec in self.workers.live() if not rec.retired]
        extra = len(live) - new
        if extra <= 0:
            return
        victims = sorted(live, key=lambda rec: rec.slot, reverse=True)[:extra]
        gi.stop_first(server, [rec.worker for rec in victims])
        for rec in victims:
            rec.retired = True
        self.hub.retire([rec.worker for rec in victims])

    def _reap_workers(self, orig: Callable[[], None]) -> None:
        server = self.server
        dead = []
        for pid in [w.pid for w in gi.workers(server)]:
            status = gi.peek_exit(pid)
            rec = self.workers.get(pid) if status is not None else None
            if rec is not None:
                rec.exit_status = status
                dead.append(rec.worker)
        # What they said last (why they exit) is read before their exits are described.
        self.hub.read_last_words(dead)
        gi.reap_past_boot_errors(server, orig, self._past_boot_error, self._reaped)

    def _past_boot_error(self) -> str | None:
        """Why a boot error does not shut the arbiter down; None: it does."""
        if self.settings.halt_on_boot_error and not self.rollout.running:
            return None
        return "rolling reload in progress" if self.rollout.running else "halt_on_boot_error=False"

    def _reaped(self, worker: Any) -> bool:
        """Whether child_exit ran for ``worker`` (its record was dropped)."""
        rec = self.workers.of(worker)
        return rec is not None and rec.exited

    def _manage_workers(self, orig: Callable[[], None]) -> None:
        server = self.server
        if self._halt:
            gi.halt(self._halt)
        while self._actions:
            action = self._actions.popleft()
            try:
                action()
            except Exception:
                server.log.exception("gunicorn-ext: operator action failed")
        self.rollout.tick(self, server.log, self.settings.reload_ready_timeout, self.clock())
        self._close_stable_probes(server)
        # Old workers of a rollout stay until their replacement is ready, and the new
        # workers of a stopped rollout are on their way out (TERMed): don't let Gunicorn
        # count them against num_workers and stop a worker that keeps its slot.
        extra = sum(1 for rec in self.workers.live()
                    if rec.rolling_old or (rec.retired and rec.planned))
        with gi.counting_extra(server, extra):
            orig()
        if not gi.workers(server) and gi.listeners(server) and not self._stopping:
            # Nobody to accept and nobody about to be forked: refuse, don't queue.
            self.gate.close(gi.listeners(server), server.log, self._held_because())

    def _close_stable_probes(self, server: gi.GunicornArbiter) -> None:
        """Close each half-open breaker whose worker has been ready restart_min_uptime."""
        now = self.clock()
        need = self.settings.restart_min_uptime
        for slot, b in self._all_breakers():
            if b.state != HALF_OPEN or b.probe_pid is None:
                continue
            probe = self.workers.get(b.probe_pid)
            ready_at = probe.ready_at if probe is not None else None
            if ready_at is None or now - ready_at < need:
                continue
            where = f"slot {probe.slot if probe is not None else slot}"
            server.log.warning(
                "gunicorn-ext: restart breaker closed: the worker in %s (pid %s) stayed up %.1fs "
                "after it was ready; respawning normally", where, b.probe_pid, now - ready_at)
            b.close()
            for s, p in self.policies.items():
                if slot is None or s == slot:
                    p.reset()

    # ------------------------------------------------------------------ exits

    def worker_exited(self, server: gi.GunicornArbiter, worker: Any) -> None:
        """child_exit: account for the exit, choose the backoff, maybe open the breaker."""
        rec = self.workers.of(worker)
        if rec is None or rec.exited:
            return
        was_ready = rec.ready
        self.workers.drop(rec)  # the one place a record goes
        pid, slot = worker.pid, rec.slot
        self.metrics.worker_exited(slot, pid)
        code, sig = rec.exit_status or (None, None)
        note = rec.exit_note
        reason = self._describe(rec, code, sig, note)
        rec.exit_reason = reason
        if rec.retired:
            return  # a replaced worker: its slot already has a successor
        if rec.rollout_new and not was_ready:
            return  # the rollout stops and gives the slot back to the old worker
        planned = bool(rec.planned or code == 0
                       or sig in _STOP_SIGNALS  # someone asked it to stop
                       or self._stopping  # the arbiter is shutting down
                       or (note is not None and note.get("planned")))
        now = self.clock()
        uptime = now - rec.started
        self.last_exit[slot] = reason
        unstable = not planned and self.unstable(code, sig, rec.ready_at, now)
        policy = self.policy(slot)
        policy.exited(now, uptime, crashed=not planned, unstable=unstable)
        self.metrics.set_restarts(slot, policy.restarts)
        b = self.breaker(slot)
        probe = b.state == HALF_OPEN and b.probe_pid == pid
        if probe:
            b.probe_pid = None  # stays half-open (the next worker tries again) unless it failed
        if planned:
            server.log.info("gunicorn-ext: worker slot %s (pid %s) exited: %s", slot, pid, reason)
        elif probe and unstable:
            wait = b.probe_failed(now)
            server.log.error(
                "gunicorn-ext: restart breaker open again: the half-open worker in slot %s (pid "
                "%s) failed: %s; next try in %gs", slot, pid, reason, wait)
            self.hub.call_later(wait + 0.01, server.wakeup)
        elif unstable and b.record(now):
            self._open_breaker(server, slot, b, reason, note)
            self.hub.call_later(b.wait + 0.01, server.wakeup)
        else:
            if b.state == OPEN:
                then = f"held by the restart breaker (next try in {b.retry_in(now):.1f}s)"
            elif b.state == HALF_OPEN:
                then = "the restart breaker is half-open: one worker at a time"
            else:
                then = f"respawning in {policy.delay:.2f}s"
                if not unstable:
                    then += " (it had served: not counted by the breaker)"
            server.log.warning("gunicorn-ext: worker slot %s (pid %s) crashed after %.1fs: %s; %s",
                               slot, pid, uptime, reason, then)
        self._report_restart_state(slot, now)
        if policy.delay and b.state == CLOSED:
            self.hub.call_later(policy.delay + 0.01, server.wakeup)

    def unstable(self, code: int | None, sig: int | None, ready_at: float | None,
                 now: float) -> bool:
        """Does this crash count toward the breaker? (see restart/breaker.py)"""
        if code in gi.BOOT_ERRORS or ready_at is None:
            return True  # it never got as far as serving
        if sig is not None:
            return False  # it served, then was killed (OOM killer, operator, chaos)
        return now - ready_at < self.settings.restart_min_uptime

    def _report_restart_state(self, slot: int, now: float) -> None:
        """Backoff and breaker gauges of ``slot`` (also from the hub thread: looks up only)."""
        policy, b = self.policies.get(slot), self._breaker_state(slot)
        state = b.state if b is not None else CLOSED
        self.metrics.set_restart_state(slot, policy.backoff_left(now) if policy else 0.0,
                                       state == OPEN, half_open=state == HALF_OPEN)

    def _open_breaker(self, server: gi.GunicornArbiter, slot: int, b: Breaker, reason: str,
                      note: dict[str, Any] | None) -> None:
        s = self.settings
        scope = "any slot" if s.restart_breaker_scope == "instance" else f"slot {slot}"
        tb = (note or {}).get("traceback")
        n, window = s.restart_breaker_failures, f"{s.restart_breaker_window:g}s"
        what = "gunicorn-ext: restart breaker open: " + (
            f"{n} crashes in {window} across slots (last in slot {slot}), last cause: {reason}. "
            if s.restart_breaker_scope == "instance" else
            f"slot {slot} crashed {n} times in {window}, last cause: {reason}. ")
        if s.restart_breaker_action == "exit":
            what += "Shutting down (restart_breaker_action='exit')."
        else:
            what += (f"Not respawning {scope} for {b.wait:g}s, then trying one worker; "
                     "`gunicorn-ext reload --rolling` or `gunicorn-ext scale N` retries at once.")
        if tb:
            what += "\nLast traceback from the worker:\n" + tb.rstrip()
        server.log.error(what)
        if s.restart_breaker_action == "exit":
            self._halt = f"restart breaker open for slot {slot}: {reason}"
            server.wakeup()

    def _describe(self, rec: WorkerRecord, code: int | None, sig: int | None,
                  note: dict[str, Any] | None) -> str:
        if rec.stop_reason:
            return rec.stop_reason
        if gi.timed_out(rec.worker):
            return f"timed out (no heartbeat for {self.server.timeout}s), killed by the arbiter"
        if note is not None and note.get("reason"):
            return str(note["reason"])
        if sig is not None:
            return f"killed by {_signame(sig)}"
        if code is not None:
            if code in gi.BOOT_ERRORS:
                return f"exit code {code} ({gi.BOOT_ERRORS[code]})"
            return f"exit code {code}"
        return "exited"

    # ----------------------------------------------------- bus handlers (hub)

    def _on_stats(self, msg: Message) -> None:
        snap = msg.payload
        if not isinstance(snap, dict) or msg.src < 0:
            return
        pid = snap.get("pid")
        if not isinstance(pid, int):
            return
        rec = self.workers.find(pid, msg.src)
        if rec is not None:
            rec.stats = snap
        self.metrics.update(msg.src, pid, snap)

    def _on_exiting(self, msg: Message) -> None:
        note = msg.payload
        if isinstance(note, dict) and isinstance(note.get("pid"), int):
            rec = self.workers.find(note["pid"], msg.src)
            if rec is not None:
                rec.exit_note = note

    def _on_ready(self, slot: int, pid: int) -> None:
        rec = self.workers.find(pid, slot)
        if rec is not None:
            rec.ready_at = self.clock()
        if self.server is not None and any(b.probe_pid == pid for _, b in self._all_breakers()):
            self.hub.call_later(self.settings.restart_min_uptime + 0.01, self.server.wakeup)
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
        now = self.clock()
        live = gi.workers(server)
        for w in live:
            pid = w.pid
            rec = self.workers.get(pid)
            if rec is None:
                continue
            proc = rec.proc
            try:
                if proc is None:
                    proc = rec.proc = psutil.Process(pid)
                    proc.cpu_percent(None)
                rss = int(proc.memory_info().rss)
                cpu = float(proc.cpu_percent(None))
            except (psutil.Error, OSError):
                continue
            rec.sampled = (rss, cpu)
            slot = rec.slot
            self.metrics.set_process(slot, pid, rss, cpu)
            if s.memory_hard_limit and rss > s.memory_hard_limit:
                first = rec.hard_kill_at
                if first is None:
                    rec.hard_kill_at = now
                    rec.stop_reason = (f"stopped by the primary: RSS {rss >> 20} MiB over "
                                       f"memory_hard_limit {s.memory_hard_limit >> 20} MiB")
                    rec.planned = True
                    server.log.warning("gunicorn-ext: worker slot %s (pid %s) %s; TERM now, KILL "
                                       "in %.0fs", slot, pid, rec.stop_reason, s.memory_hard_grace)
                    self._kill(pid, signal.SIGTERM)
                elif now - first > s.memory_hard_grace:
                    server.log.error("gunicorn-ext: worker slot %s (pid %s) still over "
                                     "memory_hard_limit after %.0fs: KILL", slot, pid, now - first)
                    self._kill(pid, signal.SIGKILL)
                    rec.hard_kill_at = float("inf")
        target = server.num_workers
        self.metrics.set_workers(target, len(live))
        for slot in list(self.policies):
            self._report_restart_state(slot, now)

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
        now = self.clock()
        rows = []
        seen = set()
        for rec in sorted(self.workers.live(), key=lambda rec: (rec.slot, rec.generation)):
            slot, pid = rec.slot, rec.pid
            if not rec.retired:
                seen.add(slot)
            stats = rec.stats
            rss, cpu = rec.sampled or (int(stats.get("rss", 0) or 0), 0.0)
            policy = self.policies.get(slot)
            breaker = self._breaker_state(slot)
            rows.append({
                "slot": slot,
                "pid": pid,
                "state": rec.state,
                "uptime": round(now - rec.started, 3),
                "requests": int(stats.get("requests", 0) or 0),
                "inflight": int(stats.get("inflight", 0) or 0),
                "rss": rss,
                "cpu": round(cpu, 1),
                "restarts": policy.restarts if policy else 0,
                "last_exit": self.last_exit.get(slot) if slot is not None else None,
                "breaker": breaker.state if breaker else CLOSED,
            })
        for slot in range(server.num_workers):
            if slot in seen:
                continue
            policy = self.policies.get(slot) or SlotPolicy()  # never written from this thread
            breaker = self._breaker_state(slot) or Breaker()
            state = "backoff" if breaker.state == CLOSED else "stopped"
            rows.append({"slot": slot, "pid": None, "state": state, "uptime": 0.0, "requests": 0,
                         "inflight": 0, "rss": 0, "cpu": 0.0, "restarts": policy.restarts,
                         "last_exit": self.last_exit.get(slot),
                         "backoff": round(policy.backoff_left(now), 3),
                         "breaker": breaker.state,
                         "breaker_retry_in": round(breaker.retry_in(now), 3)})
        rows.sort(key=lambda r: (r["slot"] if r["slot"] is not None else -1, r["state"] == "draining"))
        totals = {k: sum(int(r[k] or 0) for r in rows) for k in ("requests", "inflight", "rss")}
        totals["restarts"] = sum(p.restarts for p in list(self.policies.values()))
        return {
            "instance": self.instance,
            "primary_pid": os.getpid(),
            "uptime": round(time.time() - self._started, 3),
            "workers_target": server.num_workers,
            "workers": rows,
            "listening": not self.gate.closed,
            "totals": totals,
            "rollout": self.rollout.as_dict(),
        }

    def _breaker_state(self, slot: int | None) -> Breaker | None:
        """Read-only look-up from the hub thread (never creates a breaker)."""
        if slot is None:
            return None
        if self.settings.restart_breaker_scope == "instance":
            return self.instance_breaker
        return self.breakers.get(slot)

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

    def _reset_restarts(self) -> None:
        """An operator's reload or scale: forget backoff, close every breaker."""
        for p in list(self.policies.values()):
            p.reset()
        for _, b in self._all_breakers():
            b.close()

    def _start_rollout(self, batch: int) -> None:
        self._reset_restarts()
        slots = sorted(self.workers.used_slots())
        self.rollout.start(slots, batch)
        self.server.log.info("gunicorn-ext: rolling reload: %s", self.rollout.message)

    def _scale(self, n: int) -> None:
        self._reset_restarts()
        self.server.log.info("gunicorn-ext: scaling from %s to %s workers", self.server.num_workers, n)
        self.server.num_workers = n


__all__ = ["Supervisor", "METRICS", "STATUS"]
