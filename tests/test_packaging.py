"""The sdist and the wheel: what they hold, and a wheel that works on a gateway with no git tree.

Both are built the way `python -m build --no-isolation` would (the PEP 517 hooks of setuptools,
sdist first, then the wheel from the unpacked sdist), so nothing is fetched from the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scheduler_publisher import __version__

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "scheduler_publisher" / "data"
# Package data that must stay byte-identical to the files at the top of the tree.
COPIES = {
    DATA / "payloadStaticConfig.json": REPO / "JSON" / "payloadStaticConfig.json",
    DATA / "scheduler-publisher.service": REPO / "systemd" / "scheduler-publisher.service",
    DATA / "scheduler-publisher@.service": REPO / "systemd" / "scheduler-publisher@.service",
}
# Tracked files the sdist leaves out on purpose: git's own, and the placeholder of the
# run-time log folder.
NOT_IN_SDIST = {".gitignore", "logs/.gitkeep"}


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path
    unpacked: Path  # the sdist, extracted; the wheel was built from here


def _hook(hook: str, out: Path, cwd: Path) -> Path:
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("dist")
    sdist = _hook("build_sdist", out, REPO)
    with tarfile.open(sdist) as tar:
        tar.extractall(out, filter="data")
    unpacked = out / sdist.name.removesuffix(".tar.gz")
    wheel = _hook("build_wheel", out, unpacked)
    return Built(sdist, wheel, unpacked)


def sdist_names(built: Built) -> set[str]:
    with tarfile.open(built.sdist) as tar:
        prefix = built.unpacked.name + "/"
        return {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}


def wheel_names(built: Built) -> set[str]:
    with zipfile.ZipFile(built.wheel) as whl:
        return set(whl.namelist())


def test_package_data_copies_match_the_top_level_files() -> None:
    """The sample config and the unit in the package are the same bytes as JSON/ and systemd/."""
    for copy, source in COPIES.items():
        assert copy.read_bytes() == source.read_bytes(), (
            f"{copy.relative_to(REPO)} differs from {source.relative_to(REPO)}: "
            f"edit {source.relative_to(REPO)}, then `cp {source.relative_to(REPO)} "
            f"{copy.relative_to(REPO)}`"
        )


def test_sdist_holds_every_tracked_file_and_the_licence(built: Built) -> None:
    """The sdist is the whole tree (tests, their helpers, bench, docs, LICENSE), nothing less."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout (this is an unpacked sdist): nothing to compare with")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    names = sdist_names(built)
    missing = sorted(set(tracked) - NOT_IN_SDIST - names)
    assert missing == []
    for name in ("LICENSE", "tests/support.py", "tests/netproxy.py", "tests/conftest.py"):
        assert name in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".db", ".log"))]


def test_sdist_test_suite_collects_and_runs(built: Built) -> None:
    """In the unpacked sdist, pytest collects the whole suite and a pure test module passes."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=built.unpacked,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert " error" not in collect.stdout.splitlines()[-1]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_plan.py",
            "-k",
            "not slow",
        ],
        cwd=built.unpacked,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # It ran the sdist's own code, not this checkout's.
    where = subprocess.run(
        [sys.executable, "-c", "import scheduler_publisher as s; print(s.__file__)"],
        cwd=built.unpacked,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(built.unpacked))


def test_wheel_carries_licence_unit_sample_and_py_typed(built: Built) -> None:
    """The wheel has py.typed, the unit, the sample config, the status page, LICENSE and
    License-File metadata."""
    names = wheel_names(built)
    dist_info = f"scheduler_publisher-{__version__}.dist-info"
    for name in (
        "scheduler_publisher/py.typed",
        "scheduler_publisher/data/scheduler-publisher.service",
        "scheduler_publisher/data/scheduler-publisher@.service",
        "scheduler_publisher/data/payloadStaticConfig.json",
        f"{dist_info}/LICENSE",
        *(f"scheduler_publisher/ops/web/{page}" for page in ("index.html", "page.css", "page.js")),
    ):
        assert name in names, name
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    with zipfile.ZipFile(built.wheel) as whl:
        metadata = whl.read(f"{dist_info}/METADATA").decode()
        assert whl.read(f"{dist_info}/LICENSE") == (REPO / "LICENSE").read_bytes()
    assert "License-File: LICENSE" in metadata
    assert f"Version: {__version__}" in metadata


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel in a fresh venv; the dependencies come from this venv through a .pth line
    (a plain path: the .pth files there, this checkout's editable install among them, are not
    processed), so nothing is downloaded."""
    venv = tmp_path_factory.mktemp("gateway") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(built.wheel),
        ],
        check=True,
        capture_output=True,
    )
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    (site / "deps-from-the-test-venv.pth").write_text(f"{deps}\n")
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


def gateway(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith("SCHEDULER_PUBLISHER_")
    }
    return subprocess.run(
        [str(venv / "bin" / "scheduler-publisher"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_installed_wheel_runs_from_its_own_files(installed: Path, tmp_path: Path) -> None:
    """The installed entry point imports the wheel's package, not this checkout."""
    result = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import scheduler_publisher as s; print(s.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith(str(installed))
    version = gateway(installed, tmp_path, "--version")
    assert version.returncode == 0
    assert version.stdout.splitlines()[0] == f"scheduler-publisher {__version__}"


def test_installed_wheel_serves_the_status_page_from_its_files(
    installed: Path, tmp_path: Path
) -> None:
    """The status page's files are read from the installed package, byte for byte."""
    code = (
        "from scheduler_publisher.ops.http import ASSETS, asset; import hashlib; "
        "print(*(hashlib.sha256(asset(f)).hexdigest() for f, _ in ASSETS.values()))"
    )
    result = subprocess.run(
        [str(installed / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    web = REPO / "scheduler_publisher" / "ops" / "web"
    assert result.stdout.split() == [
        hashlib.sha256((web / f).read_bytes()).hexdigest()
        for f in ("index.html", "page.js", "page.css")
    ]


def test_wheel_install_validates_its_sample_without_the_git_tree(
    installed: Path, tmp_path: Path
) -> None:
    """Without the tree, `validate` says how to get a config; `sample-config` gives one."""
    missing = gateway(installed, tmp_path, "validate")
    assert missing.returncode == 1
    assert "--config" in missing.stderr
    assert "sample-config" in missing.stderr

    sample = gateway(installed, tmp_path, "sample-config")
    assert sample.returncode == 0
    (tmp_path / "entries.json").write_text(sample.stdout)
    checked = gateway(installed, tmp_path, "validate", "--config", "entries.json")
    assert checked.returncode == 0, checked.stderr
    assert "valid: 4 valid entries, 0 errors" in checked.stdout


def test_wheel_prints_the_unit_and_a_sample_options_file(installed: Path, tmp_path: Path) -> None:
    """`systemd-unit` prints the shipped unit (`--template`: the per-shard template unit),
    `schema` the committed entries schema, and `sample-options` TOML the service reads."""
    unit = gateway(installed, tmp_path, "systemd-unit")
    assert unit.returncode == 0
    assert unit.stdout == (REPO / "systemd" / "scheduler-publisher.service").read_text()
    template = gateway(installed, tmp_path, "systemd-unit", "--template")
    assert template.returncode == 0
    assert template.stdout == (REPO / "systemd" / "scheduler-publisher@.service").read_text()

    schema = gateway(installed, tmp_path, "schema")
    assert schema.returncode == 0
    assert schema.stdout == (REPO / "JSON" / "entries.schema.json").read_text()

    options = gateway(installed, tmp_path, "sample-options")
    assert options.returncode == 0
    (tmp_path / "options.toml").write_text(options.stdout)
    shown = gateway(installed, tmp_path, "show-options", "--options-file", "options.toml")
    assert shown.returncode == 0, shown.stderr
    assert tomllib.loads(options.stdout) == {}  # every line is a comment until edited
