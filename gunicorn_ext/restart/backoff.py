"""When may a slot respawn its worker? Exponential backoff plus a breaker.

Pure bookkeeping, no processes: the supervisor feeds it exits and asks it for
the next allowed spawn time, so the policy is easy to test on its own.
PM2's defaults anchor it: delay x1.5 per crash, capped at 15 s, reset after
30 s of stable uptime. Unlike PM2, the first crash of a stable worker respawns
at once: a lone crash should cost no more than Gunicorn's own respawn.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class SlotPolicy:
    """Restart state of one slot."""

    initial: float = 0.1
    factor: float = 1.5
    cap: float = 15.0
    stable_after: float = 30.0
    breaker_failures: int = 10
    breaker_window: float = 60.0

    #: Delay applied to the next respawn (0: respawn at once).
    delay: float = 0.0
    #: Monotonic time before which the slot must not respawn.
    not_before: float = 0.0
    #: Crashes seen, ever (restarts counted for status and metrics).
    crashes: int = 0
    #: Crashes in a row without ``stable_after`` seconds of uptime between them.
    streak: int = 0
    #: Every exit that was followed by a respawn, planned or not.
    restarts: int = 0
    breaker_open: bool = False
    _recent: collections.deque[float] = field(default_factory=collections.deque)

    def exited(self, now: float, uptime: float, crashed: bool) -> bool:
        """Record an exit; return True when this crash opened the breaker.

        A planned exit (recycling, reload, scale) respawns at once and resets
        nothing. A crash after ``stable_after`` seconds of uptime resets the
        backoff first, as PM2 does.
        """
        self.restarts += 1
        if not crashed:
            self.not_before = now
            return False
        self.crashes += 1
        if uptime >= self.stable_after:
            self.streak = 0
            self.delay = 0.0
            self._recent.clear()
        self.streak += 1
        # The first crash respawns at once (one crash costs no extra latency);
        # each further one in a row waits longer, up to the cap.
        if self.streak == 1:
            self.delay = 0.0
        elif self.delay == 0:
            self.delay = self.initial
        else:
            self.delay = min(self.delay * self.factor, self.cap)
        self.not_before = now + self.delay
        if self.breaker_failures:
            self._recent.append(now)
            while self._recent and now - self._recent[0] > self.breaker_window:
                self._recent.popleft()
            if len(self._recent) >= self.breaker_failures and not self.breaker_open:
                self.breaker_open = True
                return True
        return False

    def may_spawn(self, now: float) -> bool:
        return not self.breaker_open and now >= self.not_before

    def backoff_left(self, now: float) -> float:
        return max(0.0, self.not_before - now)

    def reset(self) -> None:
        """Forget crashes (a new deploy or an operator's scale/reload)."""
        self.delay = 0.0
        self.streak = 0
        self.not_before = 0.0
        self.breaker_open = False
        self._recent.clear()
