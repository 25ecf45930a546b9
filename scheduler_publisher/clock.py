"""The service's clock, and wall-clock sanity for gateways without a real-time clock.

Such gateways boot in 1970 (or at the fake-hwclock time) and then step the clock when NTP
syncs. APScheduler works in wall-clock time, and walks every missed slot after such a step
(APScheduler #35, #526, #1066; docs/design.md, "Why an inline executor"), so the service
refuses to schedule against an implausible clock and re-anchors its jobs when it sees the wall
clock step (docs/operations.md, "Clock steps"; docs/design.md, "The main loop, the config source and
the status snapshot").

`Clock` is what the service reads time through, so that tests can step the wall clock or
stand still; `SystemClock` is the real one.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

BUILD_YEAR = 2026  # a gateway clock earlier than this year has not been set yet
JUMP_THRESHOLD = 2.0  # seconds of disagreement between wall and monotonic time


class Clock(Protocol):
    """Time as the service's main loop reads it."""

    def wall(self) -> float:
        """Unix time (UTC): timestamps, and what a clock step moves."""
        ...

    def monotonic(self) -> float:
        """Seconds that never step: timers, debounces, durations."""
        ...


class SystemClock:
    """The real clock."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def clock_is_plausible(wall: float, build_year: int = BUILD_YEAR) -> bool:
    return datetime.fromtimestamp(wall, UTC).year >= build_year


class ClockGuard:
    """Detects wall-clock steps by comparing wall-clock and monotonic progress. Pure: the
    caller passes both readings."""

    def __init__(self, threshold: float = JUMP_THRESHOLD) -> None:
        self.threshold = threshold
        self._last: tuple[float, float] | None = None

    def observe(self, wall: float, monotonic: float) -> float | None:
        """The size of the step since the previous observation (positive: forward), or None."""
        last, self._last = self._last, (wall, monotonic)
        if last is None:
            return None
        step = (wall - last[0]) - (monotonic - last[1])
        return step if abs(step) > self.threshold else None
