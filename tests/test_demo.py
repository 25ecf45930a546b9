"""The quick start (`scripts/demo`): the embedded broker and the echo, stopped with Ctrl-C."""

from __future__ import annotations

import json
import signal
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
