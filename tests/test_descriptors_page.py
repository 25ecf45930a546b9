"""The status page of a real service whose lwt connections wait for file descriptors
(issue 27 #8): the header says how many wait, and their rows say why. Uses the browser of
tests/test_status_page.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from tests.support import Mosquitto, ServiceProcess, cli_args, free_port, wait_until, write_config
from tests.test_descriptors import WAITING, lwt_entries, nofile
from tests.test_status_page import (  # noqa: F401 - pytest finds the fixtures by name
    CONNECTION,
    ID,
    WAIT,
    browser,
    page,
    text,
    wait_rows,
)

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

    from scheduler_publisher.service import PublisherService


def test_the_page_says_which_lwt_connections_wait_for_a_descriptor(
    broker: Mosquitto,
    processes: list[ServiceProcess],
    page: Callable[[PublisherService], WebDriver],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    topic_base: str,
) -> None:
    """`ulimit -n 64` and 100 lwt entries: "Connections" reads "K of 101 up, N waiting for a
    file descriptor", and a waiting entry's row says "down: waiting for a file descriptor"."""
    config = tmp_path / "entries.json"
    write_config(config, lwt_entries(topic_base))
    port = free_port()
    proc = ServiceProcess(
        cli_args(broker.port, config, http_port=port), tmp_path, before_exec=nofile(64, 64)
    )
    processes.append(proc)
    proc.wait_for_event("descriptors_short", timeout=60)
    service = cast("PublisherService", SimpleNamespace(http=SimpleNamespace(port=port)))
    shown = page(service)

    header = re.compile(r"(\d+) of 101 up, (\d+) waiting for a file descriptor")
    found = wait_until(
        lambda: header.fullmatch(text(shown, "connections")), WAIT, message="the header"
    )
    assert int(found[1]) + int(found[2]) <= 101
    assert int(found[2]) > 0
    table = wait_rows(
        shown,
        lambda t: any(WAITING in r[CONNECTION] for r in t),
        "a row waiting for a descriptor",
    )
    waiting = [r for r in table if WAITING in r[CONNECTION]]
    assert all(r[CONNECTION].startswith("down: ") and r[ID].startswith("lwt-") for r in waiting)
