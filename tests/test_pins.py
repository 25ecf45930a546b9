"""The versions the code leans on: the dependency ranges that guard private APIs, and the exact
pins of the gate's tools (constraints.txt)."""

from __future__ import annotations

import configparser
import importlib.metadata
import re
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"


def requirements(section: str, key: str) -> dict[str, Requirement]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = [line.split("#")[0].strip() for line in config[section][key].splitlines()]
    parsed = [Requirement(line) for line in lines if line]
    return {requirement.name.lower(): requirement for requirement in parsed}


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        text = line.split("#")[0].strip()
        if text:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.]+)", text)
            assert match is not None, f"constraints.txt: {text!r} is not an exact pin"
            found[match[1].lower()] = match[2]
    return found


def test_apscheduler_stays_below_3_12_and_paho_below_2_3() -> None:
    """LoopScheduler re-implements APScheduler 3.11's private `_process_jobs`, and packet.py
    writes through paho 2.1/2.2's `_out_packet`: a new minor release is read before it is let
    in."""
    runtime = requirements("options", "install_requires")
    assert not runtime["apscheduler"].specifier.contains("3.12.0")
    assert runtime["apscheduler"].specifier.contains("3.11.3")
    assert not runtime["paho-mqtt"].specifier.contains("2.3.0")
    assert runtime["paho-mqtt"].specifier.contains("2.2.0")


def test_every_tool_of_the_gate_is_pinned_exactly() -> None:
    """Each package of the `test` and `demo` extras has one exact pin, inside its range."""
    pinned = pins()
    for extra in ("test", "demo"):
        for name, requirement in requirements("options.extras_require", extra).items():
            assert name in pinned, f"{name} (extra {extra}) is not pinned in constraints.txt"
            assert requirement.specifier.contains(pinned[name]), (name, pinned[name])


def test_the_installed_tools_are_the_pinned_ones() -> None:
    """scripts/setup installed with the constraints: what runs is what is pinned."""
    for name, version in pins().items():
        assert importlib.metadata.version(name) == version, name


def test_setup_installs_with_the_constraints() -> None:
    assert "-c constraints.txt" in (REPO / "scripts" / "setup").read_text()
