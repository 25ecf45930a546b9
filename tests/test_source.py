"""ConfigSource: unchanged, candidate or failed, against real files (pure, no broker)."""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from scheduler_publisher.config.loader import ConfigurationLoader
from scheduler_publisher.config.source import Candidate, Check, ConfigSource, Failed, Unchanged
from tests.support import entry, write_config


def run(steps: Generator[None, None, Check]) -> tuple[Check, int]:
    """The check's answer, and how many times it paused on the way."""
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value, pauses
        pauses += 1


def source(path: Path, **loader: Any) -> ConfigSource:
    return ConfigSource(ConfigurationLoader(path, **loader))


def test_first_check_is_a_candidate_and_applying_it_makes_it_unchanged(tmp_path: Path) -> None:
    """A version is unchanged only once it was applied; before that it stays a candidate."""
    path = tmp_path / "c.json"
    write_config(path, [entry("a", "t/a", 5)])
    src = source(path)
    first, _ = run(src.check())
    assert isinstance(first, Candidate)
    assert [e.id for e in first.result.entries] == ["a"]
    again, _ = run(src.check())
    assert isinstance(again, Candidate), "not applied yet: still new"
    src.applied(first.result)
    assert src.digest == first.result.digest
    assert run(src.check())[0] == Unchanged(still_broken=None)


def test_touch_and_identical_rewrite_are_unchanged(tmp_path: Path) -> None:
    """The bytes decide, not the file's times or inode."""
    path = tmp_path / "c.json"
    write_config(path, [entry("a", "t/a", 5)])
    src = source(path)
    src.applied(src.load())
    os.utime(path, (1, 1))
    replacement = tmp_path / "new.json"
    replacement.write_bytes(path.read_bytes())
    os.replace(replacement, path)
    assert isinstance(run(src.check())[0], Unchanged)


def test_an_edit_is_a_candidate_parsed_in_steps(tmp_path: Path) -> None:
    """A changed file comes back parsed, and a large one pauses between steps."""
    path = tmp_path / "c.json"
    write_config(path, [entry("a", "t/a", 5)])
    src = source(path)
    src.applied(src.load())
    write_config(path, [entry(f"e{i}", f"t/{i}", 5) for i in range(1000)])
    check, pauses = run(src.check())
    assert isinstance(check, Candidate)
    assert len(check.result.entries) == 1000
    assert pauses >= 3


def test_unchanged_carries_the_entry_errors_of_the_version_in_force(tmp_path: Path) -> None:
    """An unchanged file whose version has a rejected entry says what is still broken."""
    path = tmp_path / "c.json"
    write_config(path, [entry("a", "t/a", 5), entry("b", "t/b", 0)])
    src = source(path)
    src.applied(src.load())
    check, _ = run(src.check())
    assert isinstance(check, Unchanged)
    assert check.still_broken is not None
    assert 'id "b"' in check.still_broken
    assert "interval" in check.still_broken


def test_unusable_files_fail_with_the_reason_and_keep_the_version_in_force(tmp_path: Path) -> None:
    """Missing, too big or not a list: Failed names the file and why; the digest stays."""
    path = tmp_path / "c.json"
    write_config(path, [entry("a", "t/a", 5)])
    src = source(path, max_bytes=4096)
    src.applied(src.load())
    digest = src.digest
    path.write_text(json.dumps({"not": "a list"}))
    failed, _ = run(src.check())
    assert isinstance(failed, Failed)
    assert str(path) in failed.problem
    path.write_text("[" + " " * 5000 + "]")
    failed, _ = run(src.check())
    assert isinstance(failed, Failed)
    assert "4096-byte limit" in failed.problem
    path.unlink()
    failed, _ = run(src.check())
    assert isinstance(failed, Failed)
    assert "cannot read config file" in failed.problem
    assert src.digest == digest
