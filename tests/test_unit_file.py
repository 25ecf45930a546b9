"""The shipped systemd unit: systemd itself accepts it, and the hardening is all there."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from scheduler_publisher.cli.options import shard_spec
from scheduler_publisher.config.shard import Shard

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "scheduler-publisher.service"
TEMPLATE = REPO / "systemd" / "scheduler-publisher@.service"
EXECUTABLE = "/opt/scheduler-publisher/venv/bin/scheduler-publisher"

# `systemd-analyze verify` complaints that only mean "this is a build machine, not an
# installed gateway", and nothing else:
#  * the ExecStart binary is not installed yet (systemd 252 prints exactly this line);
#  * the static service user/group does not exist yet (systemd 252 does not check users in
#    verify; this pattern is for releases that do, and names our user explicitly).
# Anything else printed (unknown keys, unparsable values, bad dependencies) fails the test.
EXPECTED_ON_BUILD_MACHINE = [
    re.compile(
        rf"^scheduler-publisher(?:@[0-9]+-of-[0-9]+)?\.service: Command "
        rf"{re.escape(EXECUTABLE)} is not "
        r"executable: No such file or directory$"
    ),
    re.compile(
        r"^.*\b(?:[Uu]ser|[Gg]roup)\b.*\bscheduler-publisher\b.*"
        r"(?:not found|does not exist|No such process|Failed to resolve).*$"
    ),
]


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail(
            "systemd-analyze is not installed: it is required to check the unit file "
            "(Debian/Ubuntu: apt-get install systemd)"
        )
    return exe


def verify_complaints(unit: Path) -> list[str]:
    """Lines printed by `systemd-analyze verify`, minus the expected build-machine ones."""
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    lines = [line for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]
    unexpected = [
        line for line in lines if not any(p.match(line) for p in EXPECTED_ON_BUILD_MACHINE)
    ]
    if result.returncode != 0 and not lines:
        unexpected.append(f"exit status {result.returncode} with no output")
    return unexpected


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; repeated keys kept; backslash continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}: expected exactly one assignment, got {found}"
    return found[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """systemd-analyze verify prints nothing beyond the documented build-machine complaints."""
    copy = tmp_path / UNIT.name
    shutil.copyfile(UNIT, copy)
    assert verify_complaints(copy) == []


def test_verify_filter_does_not_hide_real_errors(tmp_path: Path) -> None:
    """A broken copy of the unit is reported, so the filter above is not swallowing everything."""
    copy = tmp_path / UNIT.name
    broken = UNIT.read_text().replace("ProtectClock=yes", "ProtectClock=perhaps\nBogusKey=1")
    copy.write_text(broken)
    complaints = verify_complaints(copy)
    assert any("BogusKey" in c for c in complaints), complaints
    assert any("perhaps" in c for c in complaints), complaints


def test_notify_watchdog_reload_and_restart(unit: dict[str, list[tuple[str, str]]]) -> None:
    """Type=notify with the watchdog, SIGHUP reload and restart-on-failure policy."""
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "RestartSec": "5",
        "TimeoutStopSec": "15",
        "Environment": "PYTHONUNBUFFERED=1",
        "EnvironmentFile": "-/etc/scheduler-publisher/env",
    }
    assert {k: one(service, k) for k in expected} == expected


def test_exec_start_reads_the_options_file(unit: dict[str, list[tuple[str, str]]]) -> None:
    """ExecStart names the options file (so a missing one stops the start) and no option flags,
    which would beat the file; relative paths resolve in the state directory."""
    argv = shlex.split(one(unit["Service"], "ExecStart"))
    assert argv == [
        EXECUTABLE,
        "run",
        "--options-file",
        "/etc/scheduler-publisher/scheduler-publisher.toml",
        "$SP_ARGS",
    ]
    assert one(unit["Service"], "WorkingDirectory") == "/var/lib/scheduler-publisher"


def test_ordering_and_install(unit: dict[str, list[tuple[str, str]]]) -> None:
    """Starts after the network is online and the clock is synced; enabled in multi-user."""
    for key in ("Wants", "After"):
        assert set(one(unit["Unit"], key).split()) == {"network-online.target", "time-sync.target"}
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_user_and_directories(unit: dict[str, list[tuple[str, str]]]) -> None:
    """A static user, state and configuration directories, a private umask."""
    service = unit["Service"]
    assert one(service, "User") == "scheduler-publisher"
    assert one(service, "Group") == "scheduler-publisher"
    assert values(service, "DynamicUser") == []
    assert one(service, "StateDirectory") == "scheduler-publisher"
    assert one(service, "ConfigurationDirectory") == "scheduler-publisher"
    assert one(service, "UMask") == "0077"


def test_hardening_directives(unit: dict[str, list[tuple[str, str]]]) -> None:
    """Every hardening directive the service relies on is set as intended."""
    service = unit["Service"]
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "SystemCallArchitectures": "native",
        "LogRateLimitIntervalSec": "30s",
        "LogRateLimitBurst": "20000",
    }
    assert {k: one(service, k) for k in expected} == expected
    assert set(one(service, "RestrictAddressFamilies").split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
    }
    assert values(service, "SystemCallFilter") == ["@system-service", "~@privileged @resources"]


def test_address_families_comment_explains_af_unix() -> None:
    """The comment right above RestrictAddressFamilies says AF_UNIX is for sd_notify."""
    lines = UNIT.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("RestrictAddressFamilies="))
    comment = []
    for line in reversed(lines[:index]):
        if not line.startswith("#"):
            break
        comment.append(line)
    assert any("AF_UNIX" in c and "sd_notify" in c for c in comment), comment


def test_load_credential_offered_commented_out() -> None:
    """LoadCredential= for the MQTT password is there, commented out, as an option."""
    text = UNIT.read_text()
    assert re.search(
        r"^#\s*LoadCredential=mqtt-password:/etc/scheduler-publisher/mqtt-password$",
        text,
        re.MULTILINE,
    )
    assert values(parse_unit(text)["Service"], "LoadCredential") == []


# ---- the template unit: one instance per shard ------------------------------------------------

# What a shard instance sets differently from the plain unit; everything else is the same.
TEMPLATE_ONLY = {
    ("Unit", "Description"): ["MQTT scheduled payload publisher, shard %I"],
    ("Service", "ExecStart"): [
        f"{EXECUTABLE} run --options-file "
        "/etc/scheduler-publisher/scheduler-publisher.toml --shard %i "
        "$SP_ARGS"
    ],
    ("Service", "EnvironmentFile"): [
        "-/etc/scheduler-publisher/env",
        "-/etc/scheduler-publisher/%i.env",
    ],
    ("Service", "WorkingDirectory"): ["/var/lib/scheduler-publisher/%i"],
    ("Service", "StateDirectory"): ["scheduler-publisher/%i"],
}


def test_template_instance_verifies_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify scheduler-publisher@1-of-2.service` (the template, instanced)
    prints nothing beyond the build-machine complaints."""
    shutil.copyfile(TEMPLATE, tmp_path / TEMPLATE.name)
    assert verify_complaints(tmp_path / "scheduler-publisher@1-of-2.service") == []


def test_template_is_the_unit_but_for_the_shard() -> None:
    """The template has every directive of the plain unit with the same value (hardening,
    notify, restart, ordering), except that the instance name is the shard, and each instance
    has its own environment file, working and state directory."""
    plain, template = parse_unit(UNIT.read_text()), parse_unit(TEMPLATE.read_text())
    assert list(template) == list(plain)
    for name, section in template.items():
        keys = {k for k, _ in section} | {k for k, _ in plain[name]}
        for key in sorted(keys):
            expected = TEMPLATE_ONLY.get((name, key), values(plain[name], key))
            got = [" ".join(v.split()) for v in values(section, key)]  # continuation spaces
            assert got == expected, f"[{name}] {key}"


def test_instance_names_are_shards() -> None:
    """The instance name goes to --shard as it is: `1-of-2` is shard 1/2, and a name that is
    no shard (`main`) is refused with what was expected."""
    argv = shlex.split(one(parse_unit(TEMPLATE.read_text())["Service"], "ExecStart"))
    assert argv[argv.index("--shard") + 1] == "%i"
    assert shard_spec("1-of-2") == Shard(1, 2)
    assert shard_spec("12-of-16") == Shard(12, 16)
    with pytest.raises(argparse.ArgumentTypeError, match="K-of-N"):
        shard_spec("main")


@pytest.mark.parametrize("path", [UNIT, TEMPLATE], ids=["unit", "template"])
def test_no_restart_on_a_usage_error_or_a_file_in_use_and_the_docs_are_named(path: Path) -> None:
    """Exit 2 (usage) and 6 (file in use) never fix themselves, so systemd does not restart on
    them; `systemctl status` names the man page."""
    sections = parse_unit(path.read_text())
    prevented = {
        code for v in values(sections["Service"], "RestartPreventExitStatus") for code in v.split()
    }
    assert prevented == {"2", "6"}
    assert "man:scheduler-publisher(1)" in one(sections["Unit"], "Documentation").split()
