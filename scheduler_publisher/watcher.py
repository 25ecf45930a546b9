"""Watches the config file's folder and pokes the service when the file may have changed.

The observer watches the *folder*, not the file: atomic saves (Ansible, Salt, `sed -i`, editors
with backups) replace the inode, which a watch on the file itself would lose. Events are
filtered to the exact path, as source or as the destination of a move, so editors' swap and
backup files in the same folder are ignored. The watcher never reads or parses anything: it
only calls `poke`, and the service's main loop debounces, re-reads and decides.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from scheduler_publisher.logs import get_logger

log = get_logger("scheduler_publisher.watcher")

# Opening, closing without writing and attribute changes (touch, chmod) never change content.
IGNORED_EVENTS = frozenset({"opened", "closed_no_write", "attrib"})


class _Handler(FileSystemEventHandler):
    def __init__(self, path: str, poke: Callable[[], None]) -> None:
        self._path = path
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Observer thread. An exception here would kill the observer, so none escapes.
        try:
            if event.event_type in IGNORED_EVENTS:
                return
            paths = {os.fsdecode(event.src_path), os.fsdecode(event.dest_path or b"")}
            if self._path in paths:
                self._poke()
        except Exception:
            log.exception("watch_handler_failed")


class ConfigWatcher:
    def __init__(self, path: Path, poke: Callable[[], None], *, force_polling: bool = False,
                 polling_interval: float = 0.5) -> None:
        self.path = path.resolve()
        self._poke = poke
        self._force_polling = force_polling
        self._polling_interval = polling_interval
        self._observer: BaseObserver | None = None
        self.kind = "none"

    def start(self) -> None:
        """Start watching; inotify where it works, watchdog's polling observer where it does not
        (no inotify, or the instance/watch limit reached)."""
        folder = str(self.path.parent)
        handler = _Handler(str(self.path), self._poke)
        if not self._force_polling:
            try:
                self._observer = self._started(Observer(), handler, folder)
            except OSError as exc:
                log.warning("watcher_fallback_to_polling", reason=str(exc))
            else:
                self.kind = "inotify"
                return
        self._observer = self._started(PollingObserver(timeout=self._polling_interval), handler,
                                       folder)
        self.kind = "polling"

    @staticmethod
    def _started(observer: BaseObserver, handler: _Handler, folder: str) -> BaseObserver:
        observer.schedule(handler, folder, recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(2)

    def is_alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()
