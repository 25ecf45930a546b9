"""Wall-clock sanity for gateways without a real-time clock (notes §1.6).

They boot in 1970 (or at the fake-hwclock time) and then step the clock when NTP syncs.
APScheduler works in wall-clock time, so the service refuses to schedule against an implausible
clock and re-anchors its jobs when it sees the wall clock step.
"""

from __future__ import annotations

from datetime import UTC, datetime

BUILD_YEAR = 2026  # a gateway clock earlier than this year has not been set yet
JUMP_THRESHOLD = 2.0  # seconds of disagreement between wall and monotonic time


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
