"""The quick start (`scripts/demo`): the embedded broker and the echo, stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support import REPO, ServiceProcess, cli_args, free_port, wait_until

SAMPLE = REPO / "JSON" / "payloadStaticConfig.json"

pytest.importorskip("amqtt", reason="needs the demo extra")


@pytest.mark.parametrize("run", range(3))
def test_ctrl_c_echoes_every_lwt_entry_offline_before_the_broker_stops(
    tmp_path: Path, run: int
) -> None:
    """On SIGINT the offline payload of every lwt entry, and of the status topic, is echoed:
    the service's connections close first, the echo shows what the broker still forwards,
    and only then does the embedded broker stop."""
    entries = json.loads(SAMPLE.read_text())
    lwt_topics = {e["topic"] for e in entries if e.get("lwt")}
    client_id = f"sp-demo-{run}-{uuid.uuid4().hex[:8]}"
    proc = ServiceProcess(
        cli_args(free_port(), SAMPLE, "--embedded-broker", "--echo", client_id=client_id),
        cwd=tmp_path,
    )
    try:

        def echoed(where: str) -> set[str]:
            return {
                line[5:].split(": ", 1)[0].removesuffix(" (retained)")
                for line in list(proc.stdout)
                if line.startswith("echo ") and where in line
            }

        wait_until(
            lambda: echoed('"online":1') >= lwt_topics, 20, message="every lwt entry echoed online"
        )
        proc.signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert echoed('"online":0') == {*lwt_topics, f"scheduler-publisher/{client_id}/status"}, (
            "\n".join(proc.stdout[-30:])
        )
    finally:
        proc.stop()


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_the_embedded_brokers_chatter_stays_out_of_the_output_unless_asked(
    tmp_path: Path, level: str
) -> None:
    """amqtt and its state machine log each connection and state change at INFO: the demo
    shows only their warnings, so its output is the service's lines and the echo; with
    --log-level DEBUG they show again."""
    proc = ServiceProcess(
        cli_args(free_port(), SAMPLE, "--embedded-broker", "--echo", "--log-level", level),
        cwd=tmp_path,
    )
    try:
        proc.wait_for_event("service_started", timeout=30)
        wait_until(
            lambda: any(line.startswith("echo ") for line in proc.stdout), 20, message="an echo"
        )
        proc.signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        proc.stop()
    broker_lines = [
        e
        for e in proc.events()
        if e["log.logger"].split(".")[0] in ("amqtt", "transitions")
        and e["log.level"] in ("debug", "info")
    ]
    assert bool(broker_lines) == (level == "DEBUG"), broker_lines[:3]


FAKE_PYTHON = """#!/bin/sh
# python3 -m venv DIR: a fake venv whose python prints what a build prints; its
# scheduler-publisher says how it was called.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  cp "$0" "$3/bin/python"
  printf '#!/bin/sh\\necho "started: $*"\\n' > "$3/bin/scheduler-publisher"
  chmod +x "$3/bin/scheduler-publisher"
  exit 0
fi
if [ "$1" = "-c" ]; then exit 1; fi
i=0
while [ $i -lt 107 ]; do echo "  BuildBackendWarning: line $i" >&2; i=$((i+1)); done
[ -z "${FAIL_INSTALL:-}" ]
"""


@pytest.mark.parametrize("fails", [False, True])
def test_the_demos_first_run_keeps_the_build_warnings_out_unless_the_install_fails(
    tmp_path: Path, fails: bool
) -> None:
    """scripts/demo's first install prints one line, not pip's and setuptools' build warnings;
    a failed install shows them all, and says so."""
    (tmp_path / "scripts").mkdir()
    demo = tmp_path / "scripts" / "demo"
    demo.write_text((REPO / "scripts" / "demo").read_text())
    demo.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    if fails:
        env["FAIL_INSTALL"] = "1"

    done = subprocess.run(
        [str(demo), "--port", "11883"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    if fails:
        assert done.returncode == 1
        assert done.stderr.count("BuildBackendWarning") == 107
        assert "the install failed" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines() == [
            "scripts/demo: first run, installing into .venv (a minute or so)..."
        ]
        assert done.stdout.startswith("started: run --options-file  --embedded-broker")
        assert done.stdout.rstrip().endswith("--port 11883")
