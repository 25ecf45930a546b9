"""The docs stay short enough for their readers, and every file path they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "scheduler_publisher"
PAGES = sorted([REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md")])
# A path with a folder: `scheduler_publisher/mqtt/netloop.py`, `bench/run.py`, `mqtt/session.py`.
PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|yml|json|service|toml|png))\b")
# A bare module name in backticks: `netloop.py`.
MODULE = re.compile(r"`([a-z_]+\.py)`")
# Paths into the project's own tree; others (`group_vars/x.yml`, `.vscode/settings.json`) are
# the reader's files.
OWN_FOLDERS = (
    "scheduler_publisher",
    "bench",
    "tests",
    "docs",
    "scripts",
    "systemd",
    "JSON",
    "cli",
    "config",
    "scheduling",
    "mqtt",
    "ops",
    "logs",
    "data",
)
WRITTEN_BY_RUNS = {"bench/results/latest.json"}  # git-ignored: what a benchmark run writes


def named_paths(text: str) -> set[str]:
    return {
        match
        for match in PATH.findall(text)
        if match.split("/")[0] in OWN_FOLDERS and match not in WRITTEN_BY_RUNS
    }


def exists(path: str, page: Path) -> bool:
    """Relative to the repository, the page's folder or the package (design.md's tables)."""
    places = (REPO, page.parent, PACKAGE)
    return any((place / path).exists() for place in places)


def known_module(name: str) -> bool:
    return (
        any(PACKAGE.rglob(name))
        or any(_own(found) for found in (REPO / "bench").rglob(name))
        or (REPO / "tests" / name).exists()
    )


def _own(path: Path) -> bool:
    """Not inside what a benchmark run installs under bench/ (`.runtime-venv/`, `.node-red/`),
    whose thousands of files would name almost any module."""
    return not any(part.startswith(".") for part in path.relative_to(REPO / "bench").parts)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_path_a_page_names_exists(page: Path) -> None:
    text = page.read_text()
    missing = sorted(path for path in named_paths(text) if not exists(path, page))
    missing += sorted(name for name in set(MODULE.findall(text)) if not known_module(name))
    assert missing == []


def test_readme_and_design_stay_short() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
    assert len((REPO / "docs" / "design.md").read_text().splitlines()) <= 500


def test_a_path_that_does_not_exist_is_caught() -> None:
    """The check itself: a renamed module named by a page would be found."""
    page = REPO / "docs" / "design.md"
    names = named_paths("the loop (`scheduler_publisher/network.py`) and `mqtt/link.py`")
    assert names == {"scheduler_publisher/network.py", "mqtt/link.py"}
    assert not any(exists(name, page) for name in names)
    assert not known_module("link.py")
    assert named_paths("group_vars/gw.yml and bench/results/latest.json") == set()


def test_the_filebeat_path_matches_the_log_files_the_guides_write() -> None:
    """docs/logging.md's Filebeat `paths` match the log file docs/install.md sets, its rotated
    copies and the template unit's per-shard files; not the lock file beside them."""
    import fnmatch  # noqa: PLC0415 - only this test

    logging_md = (REPO / "docs" / "logging.md").read_text()
    globs = re.findall(r"^\s+- (/\S+)$", logging_md.split("filestream", 1)[1], re.M)
    assert globs, "no Filebeat path in docs/logging.md"
    install = (REPO / "docs" / "install.md").read_text()
    (log_file,) = set(re.findall(r'log-file = "(/[^"]+)"', install))
    template = (REPO / "systemd" / "scheduler-publisher@.service").read_text()
    shard_files = [
        f.replace("K-of-N", "1-of-2") for f in re.findall(r"(/var/log/\S+-K-of-N\.log)", template)
    ]
    folder, name = log_file.rsplit("/", 1)
    for path in (log_file, f"{log_file}.1", *shard_files):
        assert any(fnmatch.fnmatch(path, g) for g in globs), (path, globs)
    assert not any(fnmatch.fnmatch(f"{folder}/.{name}.lock", g) for g in globs)
