"""LoopWatch at unit level: a real asyncio loop, blocked by a real sleep in a coroutine."""

from __future__ import annotations

import asyncio
import time

from logs import RecordingLog

from gunicorn_ext.asgi import LoopWatch


def block_the_loop_here(seconds: float) -> None:
    time.sleep(seconds)


def test_a_blocked_loop_has_its_stack_logged_once_per_stall_and_the_beat_stops_with_it() -> None:
    log = RecordingLog()

    async def main() -> LoopWatch:
        watch = LoopWatch(asyncio.get_running_loop(), 0.4, log, slot=3, interval=0.05)
        watch.start()
        await asyncio.sleep(0.3)  # the loop runs: its own timer keeps the beat
        beat = watch._beat
        await asyncio.sleep(0.2)
        assert watch._beat > beat
        block_the_loop_here(2.0)  # one stall, well over 0.4 s
        await asyncio.sleep(0.3)
        watch.stop()
        return watch

    watch = asyncio.run(main())
    reports = [t for t in log.at("critical") if "its event loop has not run for" in t]
    assert len(reports) == 1, reports
    assert "worker slot 3" in reports[0] and "in block_the_loop_here" in reports[0]
    stopped = watch._beat
    time.sleep(0.2)
    assert watch._beat == stopped  # stopped (and the loop is closed): no more beats
