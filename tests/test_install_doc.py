"""docs/install.md, tried as an operator would: its options file and its atomic save work.

The blocks are taken from the guide itself, with /etc/scheduler-publisher moved under tmp_path,
so that an edit to the guide that breaks a step fails here.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "install.md"
SAMPLE = REPO / "JSON" / "payloadStaticConfig.json"


def shell_block_after(heading: str) -> str:
    """The first ```sh block under the guide's heading that starts with `heading`."""
    text = GUIDE.read_text()
    section = text[text.index(f"## {heading}") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, f"no shell block under {heading!r}"
    return block.group(1)


def environment(tmp_path: Path) -> dict[str, str]:
    """The CLI as `scheduler-publisher` on PATH, and no option variables from this shell."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "scheduler-publisher"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m scheduler_publisher "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_PUBLISHER_")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONPATH": str(REPO)}


def test_the_guides_options_file_is_accepted_and_sets_what_the_unit_needs(tmp_path: Path) -> None:
    """Step 4's file, with the sample options appended, passes and sets broker, TLS, user,
    the entries, the state DB and journal-only logging from the file."""
    block = re.search(
        r"cat > /etc/scheduler-publisher/scheduler-publisher\.toml <<'EOF'\n"
        r"(.*?)\nEOF\n",
        GUIDE.read_text(),
        re.DOTALL,
    )
    assert block is not None, "docs/install.md no longer writes the options file with a heredoc"
    options = tmp_path / "scheduler-publisher.toml"
    env = environment(tmp_path)
    sample = subprocess.run(
        ["scheduler-publisher", "sample-options"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    options.write_text(block.group(1) + "\n" + sample)

    shown = subprocess.run(
        ["scheduler-publisher", "show-options", "--options-file", str(options)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )

    assert shown.returncode == 0, shown.stderr
    from_file = {
        line.split(" = ")[0]
        for line in shown.stdout.splitlines()
        if line.endswith(f"# file {options}")
    }
    assert from_file == {"broker", "port", "tls", "username", "config", "state-db", "log-file"}


@pytest.mark.parametrize("edit_is_valid", [True, False])
def test_the_guides_atomic_save_keeps_group_and_mode_and_refuses_a_broken_edit(
    edit_is_valid: bool, tmp_path: Path
) -> None:
    """Step 8: a valid edit replaces the file by rename with its mode and group; a broken one
    leaves the original untouched and no temporary file behind."""
    etc = tmp_path / "etc"
    etc.mkdir()
    entries = etc / "entries.json"
    entries.write_bytes(SAMPLE.read_bytes())
    entries.chmod(0o640)
    before = entries.stat()
    new_text = SAMPLE.read_text().replace("60", "30") if edit_is_valid else "[{broken"
    editor = tmp_path / "editor"
    editor.write_text(f"#!/bin/sh\ncat > \"$1\" <<'X'\n{new_text}\nX\n")
    editor.chmod(0o755)
    script = shell_block_after("8.").replace("/etc/scheduler-publisher", str(etc))

    subprocess.run(
        ["bash", "-e", "-c", script],
        env={**environment(tmp_path), "EDITOR": str(editor)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    after = entries.stat()
    assert [p.name for p in etc.iterdir()] == ["entries.json"]
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    if edit_is_valid:
        assert after.st_ino != before.st_ino  # renamed over, never written in place
        assert entries.read_text().strip() == new_text.strip()
    else:
        assert after.st_ino == before.st_ino
        assert entries.read_bytes() == SAMPLE.read_bytes()
