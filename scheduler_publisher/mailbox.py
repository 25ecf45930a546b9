"""How other threads poke the service's main loop: a few flags and one Event to wake it.

Signal handlers (via a short-lived thread), the config watcher, HTTP and the network thread
post here; only the main loop takes things out.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class ReloadRequest:
    """A reload asked for from another thread; the main loop fills in the result."""

    trigger: str  # who asked: "signal" (SIGHUP), "http" (POST /reload) or "api"
    done: threading.Event = field(default_factory=threading.Event)
    applied: bool = False


class Mailbox:
    """How other threads poke the main loop: flags plus one Event to wake it."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.stop = False
        self.stop_requested_at: float | None = None  # monotonic, the first request
        self.reloads: list[ReloadRequest] = []
        self.file_poked_at: float | None = None  # monotonic; debounced by the loop

    def post_stop(self) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        self.stop = True
        self.wake.set()

    def post_reload(self, trigger: str) -> ReloadRequest:
        request = ReloadRequest(trigger)
        with self.lock:
            self.reloads.append(request)
        self.wake.set()
        return request

    def post_file_event(self) -> None:
        self.file_poked_at = time.monotonic()
        self.wake.set()

    def take_reloads(self) -> list[ReloadRequest]:
        with self.lock:
            taken, self.reloads = self.reloads, []
        return taken
