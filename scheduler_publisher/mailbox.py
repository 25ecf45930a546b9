"""How other threads poke the service's main loop: a few flags and one Event to wake it.

Signal handlers (via a short-lived thread), the config watcher, HTTP and the network thread
post here; only the main loop takes things out. Every reload, whoever asks for it, is a
`ReloadRequest` with its trigger, taken out by the main loop in one place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# Who asked for a reload: SIGHUP, POST /reload, reload_config(), the config watcher (after
# its debounce), or the periodic safety re-read.
Trigger = Literal["signal", "http", "api", "watcher", "safety"]
# Asked for by a person or a program: announced to systemd, and logged even when the file
# turns out unchanged. The watcher and the safety re-read stay quiet when nothing changed.
MANUAL_TRIGGERS: frozenset[Trigger] = frozenset({"signal", "http", "api"})


@dataclass
class ReloadRequest:
    """A reload asked for; the main loop fills in the result."""

    trigger: Trigger
    done: threading.Event = field(default_factory=threading.Event)
    applied: bool = False

    @property
    def manual(self) -> bool:
        return self.trigger in MANUAL_TRIGGERS


@dataclass(frozen=True, slots=True)
class Debounce:
    """How long the config path must stay quiet after the watcher's last poke before it is
    re-read (docs/design.md, "Following the config path")."""

    quiet: float = 0.3  # after most changes: editors write in several steps
    # after a change that ends a write (the file closed after writing, or renamed into place):
    # only long enough to take in the events that come with it
    write_ended: float = 0.05

    def after(self, *, write_ended: bool) -> float:
        return self.write_ended if write_ended else self.quiet


class Mailbox:
    """How other threads poke the main loop: flags plus one Event to wake it.

    `monotonic` is the service's clock (clock.Clock.monotonic): the watcher's debounce is
    measured on it."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.stop = False
        # time.monotonic() of the first request, not the service clock: the shutdown budget
        # is spent in real waits
        self.stop_requested_at: float | None = None
        self._monotonic = monotonic
        self._reloads: list[ReloadRequest] = []
        self._file_poked_at: float | None = None  # monotonic; debounced by the loop
        self._file_write_ended = False  # what the last poke saw

    def post_stop(self) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        self.stop = True
        self.wake.set()

    def post_reload(self, trigger: Trigger) -> ReloadRequest:
        request = ReloadRequest(trigger)
        with self.lock:
            self._reloads.append(request)
        self.wake.set()
        return request

    def post_file_event(self, write_ended: bool = False) -> None:
        """The watcher saw a change: a "watcher" reload once the file has been quiet for the
        debounce. `write_ended`: the change ends a write, so a short debounce will do, unless
        another change comes in it."""
        with self.lock:
            self._file_poked_at = self._monotonic()
            self._file_write_ended = write_ended
        self.wake.set()

    @property
    def file_event_pending(self) -> bool:
        """A watcher poke is waiting for its debounce."""
        return self._file_poked_at is not None

    def file_event_due(self, debounce: Debounce) -> float | None:
        """When the pending watcher poke turns into a reload (monotonic); None without one."""
        poked = self._file_poked_at
        if poked is None:
            return None
        return poked + debounce.after(write_ended=self._file_write_ended)

    def take_reloads(self, debounce: Debounce) -> list[ReloadRequest]:
        """The reloads asked for so far, a watcher poke among them once its debounce is over."""
        with self.lock:  # a poke that lands meanwhile is kept for the next reload
            due = self.file_event_due(debounce)
            if due is not None and self._monotonic() >= due:
                self._file_poked_at = None
                self._reloads.append(ReloadRequest("watcher"))
            taken, self._reloads = self._reloads, []
        return taken
