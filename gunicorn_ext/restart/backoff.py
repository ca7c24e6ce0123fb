"""When may a slot respawn its worker? Exponential backoff (the breaker is breaker.py).

Pure bookkeeping, no processes: the supervisor feeds it exits and asks it for
the next allowed spawn time, so the policy is easy to test on its own.
PM2's defaults anchor it: delay x1.5 per crash, capped at 15 s, reset after
30 s of stable uptime. Unlike PM2, the first crash of a stable worker respawns
at once: a lone crash should cost no more than Gunicorn's own respawn.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SlotPolicy:
    """Restart state of one slot."""

    initial: float = 0.1
    factor: float = 1.5
    cap: float = 15.0
    stable_after: float = 30.0

    #: Delay applied to the next respawn (0: respawn at once).
    delay: float = 0.0
    #: Monotonic time before which the slot must not respawn.
    not_before: float = 0.0
    #: Crashes seen, ever (restarts counted for status and metrics).
    crashes: int = 0
    #: Unstable crashes in a row without ``stable_after`` seconds of uptime between them.
    streak: int = 0
    #: Every exit that was followed by a respawn, planned or not.
    restarts: int = 0

    def exited(self, now: float, uptime: float, crashed: bool, unstable: bool = True) -> None:
        """Record an exit and set the delay of the next respawn.

        A planned exit (recycling, reload, scale) respawns at once and resets
        nothing. A crash after ``stable_after`` seconds of uptime resets the
        backoff first, as PM2 does. Only unstable crashes (the ones the breaker
        counts) make the delay grow: a worker that served and was then killed
        waits out the current delay, so a storm of kills (OOM killer, chaos,
        an operator) costs a respawn each, not a growing outage.
        """
        self.restarts += 1
        if not crashed:
            self.not_before = now
            return
        self.crashes += 1
        if uptime >= self.stable_after:
            self.streak = 0
            self.delay = 0.0
        if not unstable:
            self.not_before = now + self.delay
            return
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

    def may_spawn(self, now: float) -> bool:
        return now >= self.not_before

    def backoff_left(self, now: float) -> float:
        return max(0.0, self.not_before - now)

    def reset(self) -> None:
        """Forget crashes (a new deploy, an operator's scale/reload, a closed breaker)."""
        self.delay = 0.0
        self.streak = 0
        self.not_before = 0.0
