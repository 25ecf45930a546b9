"""The watcher follows the config path as the operator wrote it, through every symlink and
folder: Kubernetes ConfigMap swaps, retargeted links, swapped folders and chmod reach the
wire within the debounce, not at the safety re-read (set to an hour here to prove it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler_publisher.config.shard import Shard
from scheduler_publisher.service import PublisherService
from scheduler_publisher.watcher import ConfigWatcher, followed_paths, watched_folders
from tests.support import (
    InProcessServices,
    Mosquitto,
    ServiceProcess,
    SubscriberFactory,
    cli_args,
    entry,
    json_has,
)

SWAP_SEEN_WITHIN = 5.0  # seconds: the debounce is 0.3 s, the safety re-read an hour away
Swap = Callable[[Path, str], Path]  # (folder, new file text) -> the config path


def dump(topic: str, version: int) -> str:
    return json.dumps([entry("a", topic, 3600, data={"v": version})])


# --- the layouts, each with its way of updating ------------------------------------------------


class ConfigMap:
    """What the kubelet does (AtomicWriter): the file is `..data/<name>`, `..data` is a symlink
    to a timestamped folder; an update writes a new folder, points `..data_tmp` at it, renames
    that over `..data`, and deletes the old folder."""

    def __init__(self, root: Path, name: str = "publish.json") -> None:
        self.root = root
        self.name = name  # the ConfigMap's key: the file name in the mounted folder
        self.generation = 0
        self.current: Path | None = None

    def create(self, text: str) -> Path:
        self.root.mkdir()
        self.update(text)
        (self.root / self.name).symlink_to(f"..data/{self.name}")
        return self.root / self.name

    def update(self, text: str) -> None:
        self.generation += 1
        fresh = self.root / f"..2026_11_28_17_00_{self.generation:02d}.{os.getpid()}"
        fresh.mkdir()
        (fresh / self.name).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(fresh.name)
        tmp.replace(self.root / "..data")
        if self.current is not None:
            shutil.rmtree(self.current)
        self.current = fresh


class RetargetedLink:
    """The config path is a symlink to a versioned file; an update points it at a new one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0

    def create(self, text: str) -> Path:
        (self.root / "store").mkdir(parents=True)
        (self.root / "conf").mkdir()
        link = self.root / "conf" / "publish.json"
        link.symlink_to(self._write(text))
        return link

    def _write(self, text: str) -> Path:
        self.generation += 1
        target = self.root / "store" / f"publish-{self.generation}.json"
        target.write_text(text)
        return target

    def update(self, text: str) -> None:
        tmp = self.root / "conf" / ".publish.json.new"
        tmp.symlink_to(self._write(text))
        tmp.replace(self.root / "conf" / "publish.json")


class SwappedFolder:
    """The config's folder is replaced whole: a new folder is renamed into its place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0

    def create(self, text: str) -> Path:
        (self.root / "conf").mkdir(parents=True)
        (self.root / "conf" / "publish.json").write_text(text)
        return self.root / "conf" / "publish.json"

    def update(self, text: str) -> None:
        self.generation += 1
        fresh = self.root / f"conf.{self.generation}"
        fresh.mkdir()
        (fresh / "publish.json").write_text(text)
        (self.root / "conf").rename(self.root / f"conf.old{self.generation}")
        fresh.rename(self.root / "conf")


LAYOUTS = {
    "configmap": ConfigMap,
    "retargeted-link": RetargetedLink,
    "swapped-folder": SwappedFolder,
}


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def force_polling(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def service_for(
    broker: Mosquitto, tmp_path: Path
) -> Iterator[Callable[[Path, bool], PublisherService]]:
    services = InProcessServices(tmp_path)

    def start(config: Path, polling: bool) -> PublisherService:
        return services.start(
            broker.port, config=config, safety_check_interval=3600.0, force_polling=polling
        )

    yield start
    services.close()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_swap_reaches_the_wire_within_the_debounce(
    service_for: Callable[[Path, bool], PublisherService],
    subscriber_factory: SubscriberFactory,
    tmp_path: Path,
    topic_base: str,
    layout: str,
    force_polling: bool,
) -> None:
    """Three updates in a row through a ConfigMap `..data` swap, a retargeted symlink or a
    swapped parent folder each publish the new payload within seconds; for a swapped folder
    an in-place write into the new folder afterwards does too."""
    topic = f"{topic_base}/a"
    sub = subscriber_factory(topic)
    files: Any = LAYOUTS[layout](tmp_path / "site")
    config = files.create(dump(topic, 1))
    service = service_for(config, force_polling)
    assert service.get_status()["config"]["watcher"] == ("polling" if force_polling else "inotify")
    sub.wait_for(topic, where=lambda m: m.json()["v"] == 1)
    for version in (2, 3, 4):
        files.update(dump(topic, version))
        sub.wait_for(topic, where=json_has(v=version), timeout=SWAP_SEEN_WITHIN)
    if layout == "swapped-folder":
        config.write_text(dump(topic, 5))  # the new folder's file, same inode, in place
        sub.wait_for(topic, where=lambda m: m.json()["v"] == 5, timeout=SWAP_SEEN_WITHIN)


def test_a_shard_follows_a_configmap_swap_with_only_its_entries(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    tmp_path: Path,
    topic_base: str,
    force_polling: bool,
) -> None:
    """Shard 1/2 on a ConfigMap-mounted payloadStaticConfig.json: a `..data` swap that adds
    one entry per shard (and edits one of each) reaches the wire within seconds for shard 1's
    entries, and shard 2's new entry never joins its running set (docs/scaling.md)."""

    def text(version: int, ids: list[str]) -> str:
        return json.dumps([entry(i, f"{topic_base}/{i}", 3600, data={"v": version}) for i in ids])

    sub = subscriber_factory(f"{topic_base}/#")
    files = ConfigMap(tmp_path / "config", "payloadStaticConfig.json")
    config = files.create(text(1, ["a", "c"]))  # "a", "g" are shard 1's; "c", "d" shard 2's
    services = InProcessServices(tmp_path)
    try:
        service = services.start(
            broker.port,
            config=config,
            safety_check_interval=3600.0,
            force_polling=force_polling,
            shard=Shard(1, 2),
        )
        sub.wait_for(f"{topic_base}/a", where=json_has(v=1))
        files.update(text(2, ["a", "c", "g", "d"]))
        sub.wait_for(f"{topic_base}/a", where=json_has(v=2), timeout=SWAP_SEEN_WITHIN)
        sub.wait_for(f"{topic_base}/g", where=json_has(v=2), timeout=SWAP_SEEN_WITHIN)
        assert sorted(service.get_status()["entries"]) == ["a", "g"]
        assert not [m for m in sub.snapshot() if m.topic.endswith(("/c", "/d"))]
    finally:
        services.close()


# --- the watcher alone -------------------------------------------------------------------------


class Pokes:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self, _write_ended: bool) -> None:
        self.count += 1
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(SWAP_SEEN_WITHIN), "no poke"
        self.event.clear()


@pytest.fixture
def watching(force_polling: bool) -> Iterator[Callable[[Path], Pokes]]:
    watchers: list[ConfigWatcher] = []

    def watch(path: Path) -> Pokes:
        pokes = Pokes()
        watcher = ConfigWatcher(path, pokes, force_polling=force_polling, polling_interval=0.1)
        watcher.start()
        watchers.append(watcher)
        return pokes

    yield watch
    for watcher in watchers:
        watcher.stop()


def test_chmod_restoring_read_permission_pokes(
    watching: Callable[[Path], Pokes], tmp_path: Path
) -> None:
    """chmod 000 and then 644 each poke (attribute events are no longer dropped), so a file
    made readable again is re-read at once."""
    config = tmp_path / "publish.json"
    config.write_text("[]")
    pokes = watching(config)
    config.chmod(0o000)
    pokes.wait()
    config.chmod(0o644)
    pokes.wait()


def test_chmod_of_the_folder_pokes(watching: Callable[[Path], Pokes], tmp_path: Path) -> None:
    """A folder on the way made searchable again counts as a change along the path."""
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "publish.json").write_text("[]")
    pokes = watching(folder / "publish.json")
    folder.chmod(0o700)
    pokes.wait()


def test_changes_beside_the_path_do_not_poke(
    watching: Callable[[Path], Pokes], tmp_path: Path
) -> None:
    """Other files in the watched folders (the parent's too) never poke; the file does."""
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "publish.json"
    config.write_text("[]")
    pokes = watching(config)
    for n in range(5):
        (tmp_path / "conf" / f".publish.json.swp{n}").write_text("x")
        (tmp_path / f"neighbour{n}").write_text("x")
        (tmp_path / f"neighbour{n}").chmod(0o600)
    with config.open("a") as marker:  # once it poked, the churn before it was filtered
        marker.write(" ")  # appended: a truncating write would add a third event of its own
    pokes.wait()
    assert pokes.count <= 2  # the marker's own "modified" and "closed"; the churn made 30 events


def test_followed_paths_walks_every_link_and_folder(tmp_path: Path) -> None:
    """The walk names each component, each link, and each component of each link's target,
    relative targets from the link's own folder, `..` after a link from its target."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "l1").symlink_to("real/sub")
    (tmp_path / "real" / "l2").symlink_to("../store/f.json")
    walked = followed_paths(tmp_path / "l1" / ".." / "l2")
    base = str(tmp_path)
    assert walked[-6:] == tuple(
        f"{base}/{p}" for p in ("l1", "real", "real/sub", "real/l2", "store", "store/f.json")
    )
    assert walked[0] == "/" + tmp_path.parts[1]
    assert set(watched_folders(walked)) >= {"/", base, f"{base}/real", f"{base}/store"}


def test_followed_paths_stops_at_a_symlink_loop(tmp_path: Path) -> None:
    """A link loop ends the walk (as ELOOP ends the kernel's) instead of hanging."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    walked = followed_paths(tmp_path / "a" / "publish.json")
    assert str(tmp_path / "a") in walked


# --- stopping ----------------------------------------------------------------------------------


class Churn:
    """Writes a neighbour file in the config's folder as fast as it can: a folder where
    something changes at the moment the service stops (a log, an editor, another tool)."""

    def __init__(self, folder: Path) -> None:
        self._file = folder / "neighbour.txt"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._file.write_text("x")

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_stops_after_a_sighup_log_no_error(
    broker: Mosquitto, tmp_path: Path, topic_base: str
) -> None:
    """Ten real processes, each stopped by SIGTERM about 1 s after a SIGHUP while files change
    beside the config: no stop logs anything at error (watchdog's emitter used to log
    "queue_events() called when the thread is inactive" for an event read during its stop)."""
    folder = tmp_path / "conf"
    folder.mkdir()
    config = folder / "publish.json"
    config.write_text(dump(f"{topic_base}/a", 1))
    errors: list[str] = []
    for _ in range(10):
        proc = ServiceProcess(cli_args(broker.port, config), cwd=tmp_path)
        try:
            assert proc.wait_for_event("service_started")["watcher"] == "inotify"
            proc.signal(signal.SIGHUP)
            proc.wait_for_event("config_unchanged")
            with Churn(folder):
                threading.Event().wait(1.0)  # the scenario: the stop comes a second later
                proc.signal(signal.SIGTERM)
                assert proc.wait(10) == 0
        finally:
            proc.stop()
        assert any(e.get("message") == "service_stopped" for e in proc.events())
        errors += [line for line in proc.stdout + proc.stderr if '"error"' in line]
    assert errors == []


def test_stopping_the_watcher_while_its_folder_changes_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Four hundred start/stop cycles while a neighbour file is rewritten without pause: watchdog's
    emitters never log at ERROR (an event read during their stop used to)."""
    folder = tmp_path / "conf"
    folder.mkdir()
    config = folder / "publish.json"
    config.write_text("[]")
    with caplog.at_level("ERROR", logger="watchdog"), Churn(folder):
        for _ in range(400):
            watcher = ConfigWatcher(config, lambda _write_ended: None)
            watcher.start()
            assert watcher.kind == "inotify"
            watcher.stop()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
