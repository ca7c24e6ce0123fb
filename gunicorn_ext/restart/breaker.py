"""The restart breaker: stop a crash loop, cool down, try one worker, recover.

Pure bookkeeping, no processes, like the backoff. The supervisor decides which
exits are *unstable* (a boot failure, an exit before the worker reported ready,
or one within ``restart_min_uptime`` of it; PM2 counts exits before its
``min_uptime`` the same way) and feeds only those to :meth:`Breaker.record`.
A worker that served and was then killed by a signal is never fed here.

States, as in any circuit breaker:

* ``closed``: workers respawn (under backoff); unstable exits are counted in a
  sliding window, and ``failures`` of them within ``window`` open it;
* ``open``: nothing respawns until ``retry_at`` (the cool-down);
* ``half-open``: one worker (the probe) may start. If it stays up
  ``restart_min_uptime`` after reporting ready, the breaker closes; if it has
  an unstable exit, the breaker opens again with twice the cool-down (capped).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass
class Breaker:
    """Restart breaker of one slot (or of the whole instance)."""

    failures: int = 10
    window: float = 60.0
    cooldown: float = 30.0
    max_cooldown: float = 300.0

    state: str = CLOSED
    #: The cool-down of the current open period (doubles on each failed probe).
    wait: float = 0.0
    #: Monotonic time at which an open breaker goes half-open.
    retry_at: float = 0.0
    #: The pid of the half-open breaker's one worker, once it is forked.
    probe_pid: int | None = None
    #: Times it opened, ever (a failed probe opens it again).
    trips: int = 0
    _recent: collections.deque[float] = field(default_factory=collections.deque)

    @property
    def counted(self) -> int:
        """Unstable exits in the current window."""
        return len(self._recent)

    def record(self, now: float) -> bool:
        """Count an unstable exit; True when it opened the breaker."""
        if not self.failures or self.state != CLOSED:
            return False
        self._recent.append(now)
        while self._recent and now - self._recent[0] > self.window:
            self._recent.popleft()
        if len(self._recent) < self.failures:
            return False
        self._open(now, self.cooldown)
        return True

    def due(self, now: float) -> bool:
        """An open breaker whose cool-down is over (the caller then half-opens it)."""
        return self.state == OPEN and now >= self.retry_at

    def half_open(self) -> None:
        self.state = HALF_OPEN
        self.probe_pid = None

    def may_spawn(self, now: float) -> bool:
        """May a worker start now, as far as the breaker goes?"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return False
        return self.probe_pid is None

    def probe_failed(self, now: float) -> float:
        """The half-open worker had an unstable exit: open again, twice as long."""
        self._open(now, min(max(self.wait, self.cooldown) * 2, self.max_cooldown))
        return self.wait

    def close(self) -> None:
        """The probe stayed up (or an operator said so): back to normal."""
        self.state = CLOSED
        self.wait = 0.0
        self.retry_at = 0.0
        self.probe_pid = None
        self._recent.clear()

    def retry_in(self, now: float) -> float:
        return max(0.0, self.retry_at - now) if self.state == OPEN else 0.0

    def _open(self, now: float, wait: float) -> None:
        self.state = OPEN
        self.wait = wait
        self.retry_at = now + wait
        self.probe_pid = None
        self.trips += 1
        self._recent.clear()
