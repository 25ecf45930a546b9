"""A clock tests can move: PublisherService(settings, clock=...) reads time through it."""

from __future__ import annotations

import threading
import time


class ShiftedClock:
    """The real clock plus offsets set by the test: `advance` lets time pass at once (both
    clocks move), `step_wall` steps the wall clock alone, as NTP or an operator would."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the main loop reads while the test thread moves it
        self._passed = 0.0
        self._stepped = 0.0

    def wall(self) -> float:
        with self._lock:
            return time.time() + self._passed + self._stepped

    def monotonic(self) -> float:
        with self._lock:
            return time.monotonic() + self._passed

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._passed += seconds

    def step_wall(self, seconds: float) -> None:
        with self._lock:
            self._stepped += seconds
