"""The Debian package (scripts/build-deb), built once per session, checked by lintian, and
installed, run, removed and purged with apt in one clean Debian 12 container
(localhost/debian-python:12, which scripts/debian-base builds). No mocks: real dpkg-deb, real
lintian, real apt and podman (scripts/setup installs them)."""

from __future__ import annotations

import gzip
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import scheduler_publisher
from tests.support import Mosquitto, Subscriber, call, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
NAME = "scheduler-publisher"
IMAGE = "localhost/debian-python:12"
pytestmark = pytest.mark.slow


def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def deb() -> Path:
    built = run("scripts/build-deb", timeout=600)
    assert built.returncode == 0, built.stderr
    path = REPO / built.stdout.strip().splitlines()[-1]
    assert path.name.startswith(f"{NAME}_{scheduler_publisher.__version__}_")
    return path


def page_answers(port: int) -> bool:
    try:
        return call(port, "/").status == 200
    except OSError:  # not listening yet
        return False


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("deb-broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def installed(deb: Path, broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean-install run's /out folder: one file per stage and check, and the status page's
    answer (arrived) while the service ran."""
    base = run("scripts/debian-base", timeout=900)
    assert base.returncode == 0, base.stderr
    out = tmp_path_factory.mktemp("deb-install")
    script = REPO / "tests" / "data" / "deb-clean-install.sh"
    http_port = free_port()
    sub = Subscriber(broker.port, ["site/gw01/#", "scheduler-publisher/#"]).start()
    container = subprocess.Popen(
        [
            "scripts/podman", "run", "--rm", "--network", "host",
            "-v", f"{deb.parent}:/pkg:ro",
            "-v", f"{script}:/deb-clean-install.sh:ro",
            "-v", f"{out}:/out",
            "-e", f"DEB={deb.name}",
            "-e", f"BROKER_PORT={broker.port}",
            "-e", f"HTTP_PORT={http_port}",
            IMAGE, "bash", "/deb-clean-install.sh",
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        sub.wait_for("site/gw01/boiler/temperature", timeout=300)
        wait_until(lambda: page_answers(http_port), 60, message="the status page")
        (out / "arrived").write_text(json.dumps([m.topic for m in sub.snapshot()]))
    finally:
        (out / "arrived").touch()  # lets the container go on, whatever happened here
        sub.stop()
        _, stderr = container.communicate(timeout=900)
    logs = "\n".join(f"{p.name}:\n{p.read_text()}" for p in sorted(out.glob("*.log")))
    assert container.returncode == 0, f"{stderr}\n{logs}"
    return out


def paths(out: Path, stage: str) -> dict[str, str]:
    """path -> "owner:group mode type", or "missing"."""
    lines = (out / f"{stage}.paths").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


def test_lintian_finds_no_error_and_every_override_is_used(deb: Path) -> None:
    checked = run("lintian", "--allow-root", "--pedantic", "-I", str(deb), timeout=300)
    lines = checked.stdout.splitlines()
    assert [line for line in lines if line.startswith("E:")] == []
    assert [line for line in lines if "unused-override" in line] == []
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_package_depends_on_debian_packages_and_carries_the_python_dependencies(
    deb: Path,
) -> None:
    """Depends names Debian 12 packages only; paho-mqtt and the rest travel as wheels."""
    fields = run("dpkg-deb", "--field", str(deb), "Depends", "Architecture", timeout=60).stdout
    assert "Depends: python3 (>= 3.11), python3-venv, adduser" in fields
    listing = run("dpkg-deb", "--contents", str(deb), timeout=60).stdout
    wheels = {line.split("/")[-1].split("-")[0] for line in listing.splitlines() if ".whl" in line}
    assert {"paho_mqtt", "apscheduler", "watchdog", "structlog", "prometheus_client"} <= wheels
    assert "scheduler_publisher" in wheels
    conffiles = run("dpkg-deb", "--info", str(deb), "conffiles", timeout=60).stdout.split()
    assert sorted(conffiles) == [
        "/etc/logrotate.d/scheduler-publisher",
        "/etc/scheduler-publisher/entries.json",
        "/etc/scheduler-publisher/scheduler-publisher.toml",
    ]


def test_install_creates_the_user_its_folders_and_enables_the_unit(installed: Path) -> None:
    found = paths(installed, "installed")
    assert "missing" not in found.values(), found
    assert found["/var/lib/scheduler-publisher"].startswith(f"{NAME}:{NAME} 750 directory")
    assert found["/var/log/scheduler-publisher"].startswith(f"{NAME}:{NAME} 750 directory")
    for conffile in ("scheduler-publisher.toml", "entries.json"):
        assert found[f"/etc/scheduler-publisher/{conffile}"] == f"root:{NAME} 640 regular file"
    assert found["/usr/bin/scheduler-publisher"].endswith("symbolic link")
    enabled = found["/etc/systemd/system/multi-user.target.wants/scheduler-publisher.service"]
    assert enabled.endswith("symbolic link")
    user = (installed / "installed.passwd").read_text().strip().split(":")
    assert user[0] == NAME
    assert 100 <= int(user[2]) < 1000
    assert user[5:] == ["/var/lib/scheduler-publisher", "/usr/sbin/nologin"]
    assert (installed / "installed.group").read_text().startswith(f"{NAME}:x:{user[3]}:")
    assert (installed / "installed.status").read_text().strip() == "ii"
    unit = (installed / "installed.unit").read_text().splitlines()
    assert unit[0].startswith("ExecStart=/usr/bin/scheduler-publisher run ")
    assert "LogsDirectory=scheduler-publisher" in unit


def test_the_service_user_runs_version_and_validate(installed: Path) -> None:
    """The venv was built by the postinst with Debian's python3, offline; the service user can
    read the packaged options and entries files."""
    version = (installed / "version.stdout").read_text()
    assert (installed / "version.rc").read_text().strip() == "0"
    assert version.startswith(f"scheduler-publisher {scheduler_publisher.__version__}\n")
    assert "paho-mqtt 2." in version
    assert "Python 3.11." in version
    assert (installed / "validate.rc").read_text().strip() == "0", (
        installed / "validate.stderr"
    ).read_text()
    shown = (installed / "show-options.stdout").read_text()
    assert 'log-file = "/var/log/scheduler-publisher/scheduler-publisher.log"' in shown
    assert 'config = "/etc/scheduler-publisher/entries.json"' in shown


def test_the_packaged_service_publishes_and_stops_cleanly(installed: Path) -> None:
    """Did it arrive? The installed program, as the service user with the packaged options
    (only the broker and HTTP port given as flags), reached the test's broker and served its
    status page, wrote its log file in /var/log, and stopped on SIGTERM with exit code 0."""
    topics = set(json.loads((installed / "arrived").read_text()))
    assert "site/gw01/boiler/temperature" in topics
    assert any(topic.startswith("scheduler-publisher/") for topic in topics)
    assert (installed / "run.rc").read_text().strip() == "0", (installed / "run.stderr").read_text()
    log_file = paths(installed, "installed")["/var/log/scheduler-publisher/scheduler-publisher.log"]
    assert log_file.startswith(f"{NAME}:{NAME} ")


def test_an_upgrade_keeps_the_operators_edit_and_rebuilds_the_program(installed: Path) -> None:
    assert (installed / "reinstalled-version.rc").read_text().strip() == "0"
    assert paths(installed, "reinstalled") == paths(installed, "installed")


def test_remove_keeps_the_conffiles_and_purge_removes_them(installed: Path) -> None:
    removed = paths(installed, "removed")
    assert (installed / "removed.status").read_text().strip() == "rc"
    for path in ("/usr/bin/scheduler-publisher", "/usr/lib/scheduler-publisher"):
        assert removed[path] == "missing"
    kept = ("/etc/scheduler-publisher/scheduler-publisher.toml", "/etc/logrotate.d/" + NAME)
    assert all(removed[path] != "missing" for path in kept)
    assert (installed / "removed.toml-tail").read_text() == "# edited by the operator\n"
    purged = paths(installed, "purged")
    assert {path for path, state in purged.items() if state != "missing"} == set()
    assert (installed / "purged.status").read_text().strip() == ""


def test_man_page_completion_copyright_and_changelog_come_from_the_sources(
    deb: Path, tmp_path: Path
) -> None:
    """The man page and the bash completion are generated from the argument parser (a new
    option shows up in both), the copyright is LICENSE's MIT, the changelog names this
    version."""
    assert run("dpkg-deb", "-x", str(deb), str(tmp_path), timeout=60).returncode == 0
    share = tmp_path / "usr" / "share"
    man = gzip.decompress((share / "man" / "man1" / f"{NAME}.1.gz").read_bytes()).decode()
    assert man.startswith('.TH SCHEDULER\\-PUBLISHER "1"')
    for option in ("\\-\\-options\\-file", "\\-\\-shard", "show\\-options", "systemd\\-unit"):
        assert option in man
    completion = (share / "bash-completion" / "completions" / NAME).read_text()
    assert "--options-file" in completion
    assert f"complete -o bashdefault -F _shtab_scheduler_publisher {NAME}" in completion
    copyright_ = (share / "doc" / NAME / "copyright").read_text()
    assert "License: Expat" in copyright_
    assert "Permission is hereby granted, free of charge" in copyright_
    changelog = gzip.decompress((share / "doc" / NAME / "changelog.gz").read_bytes()).decode()
    assert changelog.startswith(f"{NAME} ({scheduler_publisher.__version__}) unstable;")
