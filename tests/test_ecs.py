"""Every log line conforms to ECS 9.4 and the ecs-logging spec, checked against Elastic's own
reference files (tests/data, copied from elastic/ecs v9.4.0 and elastic/ecs-logging).

The scenario runs the real service against a real Mosquitto and checks every line it writes,
on stdout and in the log file.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from scheduler_publisher.logs import ecs
from tests.support import (
    REPO,
    Mosquitto,
    ServiceProcess,
    cli_args,
    entry,
    wait_until,
    write_config,
)

DATA = Path(__file__).parent / "data"
MAX_LINE = 8192  # bytes, with the newline
# Beyond the spec's required fields, every line of ours carries these (issue 10).
ALWAYS = ("ecs.version", "log.logger", "service.name", "service.version", "process.pid")


# ---- the checker ----------------------------------------------------------------------------


@cache
def ecs_fields() -> dict[str, str]:
    """Every ECS field and its type, from Elastic's fields.csv."""
    with (DATA / "ecs" / "fields.csv").open(encoding="utf-8") as f:
        return {row["Field"]: row["Type"] for row in csv.DictReader(f)}


@cache
def ecs_objects() -> frozenset[str]:
    """Every name ECS uses as an object on the way to a field (`error`, `process.parent`)."""
    parts = (field.split(".") for field in ecs_fields())
    return frozenset(".".join(p[:i]) for p in parts for i in range(1, len(p)))


@cache
def spec() -> dict[str, Any]:
    spec_data: dict[str, Any] = json.loads((DATA / "ecs-logging" / "spec.json").read_text())
    return spec_data["fields"]  # type: ignore[no-any-return]


def _type_ok(ecs_type: str, value: Any) -> bool:
    if value is None:
        return True  # Elasticsearch indexes nothing for null
    if isinstance(value, list):  # any field may hold an array of its type
        return all(_type_ok(ecs_type, v) for v in value)
    if ecs_type in ("keyword", "constant_keyword", "wildcard", "match_only_text", "text", "ip"):
        return isinstance(value, str)
    if ecs_type in ("long", "integer", "short", "byte"):
        return isinstance(value, int) and not isinstance(value, bool)
    if ecs_type in ("float", "double", "scaled_float", "half_float"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if ecs_type == "boolean":
        return isinstance(value, bool)
    if ecs_type == "date":
        return isinstance(value, str) and _is_iso_date(value)
    if ecs_type in ("object", "flattened", "nested"):
        return isinstance(value, dict)
    return ecs_type == "geo_point" and isinstance(value, dict | str)


def _is_iso_date(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def expand(event: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as objects, as Filebeat's `expand_keys` and Elasticsearch read them."""
    tree: dict[str, Any] = {}
    for key, value in event.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {part!r} is both a value and an object")  # noqa: TRY004 -- a data conflict, caught below
        if leaf in node and (isinstance(node[leaf], dict) and isinstance(value, dict)):
            node[leaf].update(value)
        elif leaf in node:
            raise ValueError(f"{key}: given twice")
        else:
            node[leaf] = value
    return tree


def problems(line: str) -> list[str]:
    """What makes one log line non-conformant; [] when it is fine."""
    found: list[str] = []
    if len(line.encode()) + 1 > MAX_LINE:
        found.append(f"{len(line.encode()) + 1} bytes, over {MAX_LINE}")
    try:
        event = json.loads(line)
    except ValueError:
        return [*found, f"not JSON: {line[:80]!r}"]
    if not isinstance(event, dict):
        return [*found, "not a JSON object"]
    ordered = sorted(
        (f for f, d in spec().items() if "index" in d), key=lambda f: spec()[f]["index"]
    )
    if list(event)[: len(ordered)] != ordered:
        found.append(f"starts with {list(event)[: len(ordered)]}, spec wants {ordered}")
    required = [f for f, d in spec().items() if d.get("required")]
    found += [f"missing {f}" for f in dict.fromkeys([*required, *ALWAYS]) if f not in event]
    found += [
        f"{f}: spec type {spec()[f]['type']}, got {event[f]!r}"
        for f in spec()
        if f in event and not _spec_type_ok(spec()[f]["type"], event[f])
    ]
    try:
        tree = expand(event)
    except ValueError as exc:
        return [*found, str(exc)]
    _walk(tree, "", found)
    return found


def _spec_type_ok(spec_type: str, value: Any) -> bool:
    if spec_type == "datetime":
        return isinstance(value, str) and _is_iso_date(value)
    if spec_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, dict) if spec_type == "object" else isinstance(value, str)


def _walk(node: dict[str, Any], prefix: str, found: list[str]) -> None:
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in ecs_fields():
            if not _type_ok(ecs_fields()[path], value):
                found.append(f"{path}: ECS type {ecs_fields()[path]}, got {value!r:.80}")
        elif path in ecs_objects():
            if isinstance(value, dict):
                _walk(value, f"{path}.", found)
            else:
                found.append(f"{path}: an object in ECS, got {value!r:.80}")
        elif prefix or key in ecs.ECS_ROOTS:
            root = path.split(".", maxsplit=1)[0]
            found.append(f"{path}: not an ECS field, but inside ECS's {root!r}")


def json_types(events: list[dict[str, Any]]) -> dict[str, set[str]]:
    """The JSON types each top-level field takes across lines (numbers count as one)."""
    names = {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }
    types: dict[str, set[str]] = {}
    for event in events:
        for key, value in event.items():
            if value is not None:
                types.setdefault(key, set()).add(names[type(value)])
    return types


# ---- the checker, checked -------------------------------------------------------------------


GOOD = {
    "@timestamp": "2026-01-02T03:04:05.678Z",
    "log.level": "info",
    "message": "m",
    "ecs.version": "9.4.0",
    "log.logger": "t",
    "service.name": "s",
    "service.version": "1",
    "process.pid": 1,
}


def test_reference_files_are_the_ones_named_in_the_readme() -> None:
    """fields.csv is ECS 9.4.0 and spec.json wants @timestamp, log.level, message first."""
    with (DATA / "ecs" / "fields.csv").open(encoding="utf-8") as f:
        assert {row["ECS_Version"] for row in csv.DictReader(f)} == {"9.4.0"}
    assert ecs_fields()["error.message"] == "match_only_text"
    assert [f for f in spec() if "index" in spec()[f]] == ["@timestamp", "log.level", "message"]


def test_the_checker_accepts_a_good_line_and_names_each_fault() -> None:
    """A conformant line has no problems; each classic fault is reported."""
    assert problems(json.dumps(GOOD)) == []
    assert problems(json.dumps({**GOOD, "error.message": "x", "server.port": 80})) == []
    faults = {
        "error": {**GOOD, "error": "plain string"},
        "host": {**GOOD, "host": "127.0.0.1"},
        "process.pid": {**GOOD, "process.pid": "12"},
        "missing ecs.version": {k: v for k, v in GOOD.items() if k != "ecs.version"},
        "starts with": {"log.level": "info", **GOOD},
        "bytes": {**GOOD, "pad": "x" * 9000},
        "both a value and an object": {**GOOD, "topic": "a", "topic.name": "b"},
        "inside ECS's 'error'": {**GOOD, "error.detail": "x"},
    }
    for expected, line in faults.items():
        assert any(expected in p for p in problems(json.dumps(line))), expected


def test_the_namespace_list_matches_fields_csv() -> None:
    """ecs.ECS_ROOTS, which moves colliding names, is exactly ECS 9.4's top-level names."""
    assert {field.split(".")[0] for field in ecs_fields()} == ecs.ECS_ROOTS
    assert ecs.ECS_VERSION == "9.4.0"
    for field, expected in ecs.ECS_TYPES.items():
        sample = GOOD["@timestamp"] if expected is str else 1
        assert _type_ok(ecs_fields()[field], sample), field


def logged_event_names() -> set[str]:
    """The event names the code logs: the first argument of each log call."""
    call = re.compile(
        r"(?:\.(?:debug|info|warning|error|exception|critical)|\bemit|_report)"
        r'\(\s*"([a-z][a-z_]*)"'
    )
    alternative = re.compile(r'\bemit\(\s*"[a-z_]+" if [^\n]* else "([a-z][a-z_]*)"')
    names: set[str] = set()
    for path in (REPO / "scheduler_publisher").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        names |= set(call.findall(text)) | set(alternative.findall(text))
    return names


def test_docs_list_every_event_the_code_logs() -> None:
    """docs/logging.md has one table row per event name in the code, and no stale rows."""
    rows = re.findall(r"^\| `([a-z_]+)` \|", (REPO / "docs" / "logging.md").read_text(), re.M)
    assert len(rows) == len(set(rows))
    code = logged_event_names()
    assert {"config_entry_warning", "log_file_write_recovered", "service_start_failed"} <= code
    assert sorted(code - set(rows)) == [], "events missing from docs/logging.md"
    assert sorted(set(rows) - code) == [], "rows in docs/logging.md for events never logged"


def logged_field_names() -> dict[str, set[str]]:
    """Keyword names of every log call in the code, by event name."""
    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    found: dict[str, set[str]] = {}
    for path in (REPO / "scheduler_publisher").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in levels
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = {k.arg for k in node.keywords if k.arg is not None}
                found.setdefault(str(node.args[0].value), set()).update(names)
    return found


def test_log_calls_name_no_ecs_field_by_accident() -> None:
    """Every keyword at a log call is an ECS field with its type, one of the names the pipeline
    maps (error, host, port, broker), or a name outside ECS: none lands in the namespace."""
    mapped = {"error", "host", "port", "broker"}
    fields = logged_field_names()
    assert "config_reload_failed" in fields
    clashes = {
        (event, name)
        for event, names in fields.items()
        for name in names - mapped
        if name.split(".", 1)[0] in ecs.ECS_ROOTS and name not in ecs.ECS_TYPES
    }
    assert clashes == set()


# ---- the scenario ---------------------------------------------------------------------------

# Makes one entry's tick raise, for a real exception through the real pipeline (`tick_failed`).
INJECT = """
import scheduler_publisher.mqtt.connection as connection

_original = connection.MQTTConnectionManager.tick


def tick(self, entry_id, *args, **kwargs):
    if entry_id == "boom":
        raise RuntimeError("injected for the ECS test")
    return _original(self, entry_id, *args, **kwargs)


connection.MQTTConnectionManager.tick = tick
"""


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else is already listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def service(
    tmp_path: Path, broker: Mosquitto, busy_port: int
) -> Iterator[Callable[[list[dict[str, Any]]], ServiceProcess]]:
    procs: list[ServiceProcess] = []

    def start(entries: list[dict[str, Any]]) -> ServiceProcess:
        (tmp_path / "inject").mkdir()
        (tmp_path / "inject" / "sitecustomize.py").write_text(INJECT)
        write_config(tmp_path / "config.json", entries)
        proc = ServiceProcess(
            cli_args(
                broker.port,
                tmp_path / "config.json",
                "--http-host",
                "127.0.0.1",
                "--log-level",
                "DEBUG",
                "--stats-interval",
                "1",
                command=(),
                http_port=busy_port,
                log_file=tmp_path / "service.log",
                backoff=(0.2, 1),
            ),
            cwd=tmp_path,
            env={
                "PYTHONPATH": os.pathsep.join(
                    [str(tmp_path / "inject"), os.environ.get("PYTHONPATH", "")]
                )
            },
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def count(proc: ServiceProcess, name: str) -> int:
    return sum(e.get("message") == name for e in proc.events())


@pytest.mark.slow
def test_every_line_of_a_rough_run_conforms_to_ecs(
    tmp_path: Path,
    broker: Mosquitto,
    busy_port: int,
    service: Callable[[list[dict[str, Any]]], ServiceProcess],
) -> None:
    """Invalid entries, a busy HTTP port, a broker restart, a reload to 3,000 entries and back,
    a broken edit and an exception: every line on stdout and in the file is ECS 9.4, follows
    the ecs-logging spec, is under 8 KiB, and each field keeps one JSON type."""
    base = f"sp-test/{uuid.uuid4().hex[:8]}"
    small = [
        entry("ok", f"{base}/ok", 0.5),
        entry("boom", f"{base}/boom", 0.5),
        {**entry("bad-qos", f"{base}/q"), "qos": 7},
        entry("bad-interval", f"{base}/i", 0),
    ]
    proc = service(small)
    proc.wait_for_event("service_started", timeout=30)
    proc.wait_for_event("tick_failed", timeout=15)

    broker.restart()
    wait_until(lambda: count(proc, "mqtt_connected") >= 2, 30, message="reconnect")

    many = [entry(f"sensor-{i:05d}", f"{base}/s/{i}", 3600) for i in range(3000)]
    write_config(tmp_path / "config.json", small[:2] + many)
    proc.wait_for_event("config_reloaded", timeout=60)
    (tmp_path / "config.json").write_text('[{"id": "half-written"')
    proc.wait_for_event("config_reload_failed", timeout=30)
    write_config(tmp_path / "config.json", small[:2])
    wait_until(lambda: count(proc, "config_reloaded") >= 2, 60, message="the reload back")
    proc.wait_for_event("publisher_statistics", timeout=15)
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.stop()

    stdout = [line for line in proc.stdout if line.strip()]
    file_lines = (tmp_path / "service.log").read_text(encoding="utf-8").splitlines()
    for where, lines in (("stdout", stdout), ("file", file_lines)):
        bad = {line[:200]: p for line in lines if (p := problems(line))}
        assert not bad, f"{where}: {len(bad)} of {len(lines)} lines:\n" + "\n".join(
            f"{p}\n  {line}" for line, p in list(bad.items())[:10]
        )
    events = [json.loads(line) for line in file_lines]
    mixed = {k: t for k, t in json_types(events).items() if len(t) > 1}
    assert not mixed, f"fields with more than one JSON type (ES would reject some): {mixed}"

    by_name = {e["message"]: e for e in events}
    invalid = [e for e in events if e["message"] == "config_entry_invalid"]
    assert {e["entry_id"] for e in invalid} >= {"bad-qos", "bad-interval"}
    assert all(e["error.message"] for e in invalid)
    bind = by_name["http_bind_failed"]
    assert (bind["server.address"], bind["server.port"]) == ("127.0.0.1", busy_port)
    assert "in use" in bind["error.message"]
    tick = by_name["tick_failed"]
    assert tick["error.type"] == "RuntimeError"
    assert tick["error.message"] == "injected for the ECS test"
    assert "Traceback" in tick["error.stack_trace"]
    assert by_name["mqtt_connected"]["server.port"] == broker.port
    assert "config.json" in by_name["config_reload_failed"]["error.message"]
    grown, shrunk = [e for e in events if e["message"] == "config_reloaded"]
    assert grown["added_count"] == 3000
    assert grown["added"][-1] == "and 2980 more"
    assert shrunk["removed_count"] == 3000
    assert len(json.dumps(grown)) < MAX_LINE
