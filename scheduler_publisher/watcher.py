"""Watches the config path as the operator wrote it, and pokes the service when it may have
changed.

Opening `/etc/sp/publish.json` looks at more than one file: every folder on the way, and
every symlink with everything its target names in turn. A Kubernetes ConfigMap update swaps a
`..data` symlink, an operator retargets a symlink or renames a whole folder into place, and
`chmod` makes an unreadable file readable again: none of these writes the file itself. So the
watcher watches the folder of every path the kernel walks through (`followed_paths`), and
pokes on any event whose path is one of them. When the walk changes (a retargeted link, a
swapped folder), `refresh()` moves the watches; the main loop calls it before every debounced
re-read, so a change made while the watches move is still read (docs/design.md).

Events for other names in the same folders (editors' swap and backup files) are ignored. The
watcher never reads or parses anything: it only calls `poke`, saying whether the change ends
a write (`ends_a_write`), and the service's main loop debounces, re-reads and decides. With
--force-polling (or where inotify is unavailable) a thread compares `lstat` fingerprints of
the same paths instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter

from scheduler_publisher.logs.setup import get_logger

log = get_logger("scheduler_publisher.watcher")

# Opening and closing without writing never change content, and the service's own reads
# cause them. Attribute changes do count: `chmod` can make an unreadable file readable.
IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})
MAX_SYMLINK_HOPS = 40  # Linux's own limit (ELOOP) for one path lookup
EMITTER_STOP_WAIT = 2.0  # seconds; watchdog holds an unpaired move for 0.5 s
# inotify itself is unusable (no instances or watches left, or not supported): poll instead.
_NO_INOTIFY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOSYS, errno.ENOMEM})

ROOT = Path("/")
# What the watcher calls, with whether the change ends a write (`ends_a_write`).
Poke = Callable[[bool], None]
Fingerprint = tuple[tuple[str, tuple[int, ...] | None, str | None], ...]


def followed_paths(path: Path) -> tuple[str, ...]:
    """Every path the kernel looks up to open `path`, in order: each component of it, and, at
    each symlink, each component of the link's target. Missing parts end nothing: the walk goes
    on as if they were plain folders, so their creation is noticed too."""
    seen: list[str] = []
    # absolute(), not resolve(): resolving is the walk below, which must see every link.
    pending = list(reversed(path.absolute().parts))
    current = ROOT
    hops = 0
    while pending:
        part = pending.pop()
        if part == "/":
            current = ROOT
        elif part == "..":
            current = current.parent
        elif part not in ("", "."):
            current = current / part
            seen.append(str(current))
            target = _link_target(current)
            if target is not None and hops < MAX_SYMLINK_HOPS:
                hops += 1
                current = current.parent  # a relative target is relative to the link's folder
                pending.extend(reversed(target.parts))  # an absolute one starts with "/"
    return tuple(dict.fromkeys(seen))


def _link_target(path: Path) -> Path | None:
    try:
        return path.readlink()
    except OSError:  # not a symlink, missing, or not searchable
        return None


def watched_folders(paths: tuple[str, ...]) -> tuple[str, ...]:
    """The folders whose entries are `paths`: watching these sees each path change."""
    return tuple(dict.fromkeys(str(Path(p).parent) for p in paths))


def fingerprint(paths: tuple[str, ...]) -> Fingerprint:
    """What can change about each path without its name changing: which inode it is, its
    type and permissions, size and times, and a symlink's target."""
    found: list[tuple[str, tuple[int, ...] | None, str | None]] = []
    for path in paths:
        try:
            info = Path(path).lstat()
        except OSError:
            found.append((path, None, None))
            continue
        stamp = (
            info.st_dev,
            info.st_ino,
            info.st_mode,
            info.st_size,
            info.st_mtime_ns,
            info.st_ctime_ns,
        )
        target = _link_target(Path(path))
        found.append((path, stamp, None if target is None else str(target)))
    return tuple(found)


def _identity(folder: str) -> tuple[int, int] | None:
    try:
        info = Path(folder).stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def ends_a_write(event_type: str, src: str, dest: str, paths: frozenset[str]) -> bool:
    """Whether an event on the followed paths finishes a change: one of them closed after
    writing (IN_CLOSE_WRITE), or something renamed onto one of them (a save by rename, a
    swapped symlink or folder). A change that does not (a truncate, a write, a create, a
    removal) may be the first of several."""
    return (event_type == "closed" and src in paths) or (event_type == "moved" and dest in paths)


class _Handler(FileSystemEventHandler):
    def __init__(self, paths: tuple[str, ...], poke: Poke) -> None:
        self.paths = frozenset(paths)  # replaced whole by refresh() (main loop), read here
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Observer thread. An exception here would kill the observer, so none escapes.
        try:
            if event.event_type in IGNORED_EVENTS or (
                event.is_directory and event.event_type == "modified"
            ):
                # watchdog adds a "modified" event for the folder at every change inside it;
                # a change that matters arrives as its own event, with its own path.
                return
            src, dest = os.fsdecode(event.src_path), os.fsdecode(event.dest_path or b"")
            paths = self.paths
            if src in paths or dest in paths:
                self._poke(ends_a_write(event.event_type, src, dest, paths))
        except Exception:
            log.exception("watch_handler_failed")


class _InotifyEmitter(InotifyEmitter):
    """watchdog's inotify emitter, stopped without its shutdown race.

    watchdog's stop() first drops the emitter's watch group and only then closes the group's
    queue; an event read in between (any change in a watched folder at that moment) makes
    queue_events() log "called when the thread is inactive" at ERROR although nothing is wrong
    (the check came with gorakhargosh/watchdog#963). Here the queue is closed first and the
    emitter thread may finish its turn; only then does watchdog's own stop run.
    """

    def on_thread_stop(self) -> None:
        group = getattr(self, "_inotify", None)
        if group is not None:
            group.deactivate()  # no new events; a blocked read_event() returns None
        if self.is_alive() and self is not threading.current_thread():
            self.join(EMITTER_STOP_WAIT)
        super().on_thread_stop()


class _FolderWatch:
    """One watched folder: the observer's handle and which folder (inode) it is bound to."""

    def __init__(self, handle: ObservedWatch, identity: tuple[int, int] | None) -> None:
        self.handle = handle
        self.identity = identity


class ConfigWatcher:
    def __init__(
        self, path: Path, poke: Poke, *, force_polling: bool = False, polling_interval: float = 0.5
    ) -> None:
        self.path = path.absolute()  # as written: links are followed afresh at every walk
        self._poke = poke
        self._force_polling = force_polling
        self._polling_interval = polling_interval
        self._observer: BaseObserver | None = None
        self._handler = _Handler(followed_paths(self.path), poke)
        self._watches: dict[str, _FolderWatch] = {}
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self.kind = "none"

    def start(self) -> None:
        """Start watching; inotify where it works, polling where it does not (no inotify, or
        the instance/watch limit reached)."""
        if not self._force_polling:
            try:
                self._start_inotify()
            except OSError as exc:
                log.warning("watcher_fallback_to_polling", reason=str(exc))
                self._stop_observer()
            else:
                self.kind = "inotify"
                return
        baseline = fingerprint(followed_paths(self.path))  # now: a change from here on counts
        self._poller = threading.Thread(
            target=self._poll, args=(baseline,), name="config-poller", daemon=True
        )
        self._poller.start()
        self.kind = "polling"

    def _start_inotify(self) -> None:
        observer = BaseObserver(_InotifyEmitter)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._rewatch(followed_paths(self.path))

    def refresh(self) -> None:
        """Main loop, before a re-read: follow the path again and move the watches if a link
        now points elsewhere or a folder on the way was replaced."""
        if self._observer is None:
            return
        try:
            self._rewatch(followed_paths(self.path))
        except OSError as exc:  # out of watches: the safety re-read still covers the file
            log.warning("watcher_refresh_failed", reason=str(exc))

    def _rewatch(self, paths: tuple[str, ...]) -> None:
        assert self._observer is not None
        self._handler.paths = frozenset(paths)
        wanted = watched_folders(paths)
        for folder in [f for f in self._watches if f not in wanted]:
            self._unwatch(self._observer, folder)
        for folder in wanted:
            self._watch(self._observer, folder)

    def _watch(self, observer: BaseObserver, folder: str) -> None:
        identity = _identity(folder)
        current = self._watches.get(folder)
        if current is not None and current.identity == identity:
            return
        if current is not None:  # the folder was replaced: the watch follows the old inode
            self._unwatch(observer, folder)
        if identity is None:
            return  # missing for now: the watch on its parent sees it appear
        try:
            handle = observer.schedule(self._handler, folder, recursive=False)
        except OSError as exc:
            if exc.errno in _NO_INOTIFY:
                raise
            return  # gone or unreadable since the stat: its parent's watch covers it
        self._watches[folder] = _FolderWatch(handle, identity)

    def _unwatch(self, observer: BaseObserver, folder: str) -> None:
        with contextlib.suppress(KeyError):  # already gone from the observer's tables
            observer.unschedule(self._watches.pop(folder).handle)

    def _poll(self, last: Fingerprint) -> None:
        """Poller thread: poke whenever anything along the path looks different."""
        while not self._stop_polling.wait(self._polling_interval):
            try:
                now = fingerprint(followed_paths(self.path))
            except Exception:  # the poller must survive anything one walk runs into
                log.exception("watch_poll_failed")
                continue
            if now != last:
                last = now
                self._poke(False)  # a fingerprint cannot tell whether a write has ended

    def stop(self) -> None:
        self._stop_observer()
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join(2)

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(2)
        self._watches.clear()

    def is_alive(self) -> bool:
        if self._poller is not None:
            return self._poller.is_alive()
        return self._observer is not None and self._observer.is_alive()
