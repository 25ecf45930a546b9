"""The config file: JSON text in, validated and frozen PublishConfig entries out.

Parsing is pure and never gives up on the whole file because of one entry: every problem of
every entry is reported at once, bad entries are skipped and good ones are kept. That holds
for an entry JSON itself refuses (NaN, an over-long integer, too deep) as long as the rest of
the file reads. Only a file that is not a readable JSON array of entries raises
(ConfigFileError).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from scheduler_publisher.config import document
from scheduler_publisher.config.entry import MessageProperties, PublishConfig, QoS
from scheduler_publisher.config.fields import (
    Finding,
    Severity,
    id_label,
    render_value,
    unknown_member,
)
from scheduler_publisher.config.rules import (
    FIELD_RULES,
    FIELDS_BY_NAME,
    alternative_findings,
    placeholder_findings,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ConfigError",
    "ConfigFileError",
    "ConfigResult",
    "ConfigurationLoader",
    "MessageProperties",
    "Problem",
    "PublishConfig",
    "QoS",
    "Severity",
    "config_digest",
    "parse_config",
    "parse_config_steps",
    "permission_warnings",
    "read_config_file",
]

DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024


class ConfigError(Exception):
    """Base of the errors this module raises on purpose."""


class ConfigFileError(ConfigError):
    """The file as a whole is unusable: unreadable, too large, not JSON, or not an entry list."""

    def __init__(
        self, source: str, detail: str, *, line: int | None = None, column: int | None = None
    ) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail
        self.line = line  # where in the file, when the problem has a place (1-based)
        self.column = column


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about the config, located precisely enough to fix it."""

    severity: Severity
    position: int | None  # 1-based entry position; None for the file as a whole
    entry_id: str | None
    field: str | None
    message: str
    # The message's parts, for machine-readable output: not compared, the message says it all.
    expected: str | None = dataclasses.field(default=None, compare=False)
    received: str | None = dataclasses.field(default=None, compare=False)  # None: absent
    # Where the entry starts in the file (1-based), when known. Not compared: the same problem
    # moved by an edit elsewhere in the file is the same problem.
    line: int | None = dataclasses.field(default=None, compare=False)
    column: int | None = dataclasses.field(default=None, compare=False)

    def __str__(self) -> str:
        if self.position is None:
            return self.message
        return f"entry {self.position}{id_label(self.entry_id)}: {self.message}"


@dataclass(frozen=True, slots=True)
class ConfigResult:
    """The valid entries, every problem found, and which ids were rejected."""

    entries: tuple[PublishConfig, ...]
    problems: tuple[Problem, ...]  # in file order
    invalid_ids: frozenset[str]  # the caller keeps the last good version of these running
    digest: str  # sha256 of the raw bytes: an unchanged file needs no reload

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")


# --- validating entries ----------------------------------------------------------------------


class _Checked(NamedTuple):
    config: PublishConfig | None
    problems: list[Problem]
    entry_id: str | None


def _usable_id(value: Any) -> str | None:
    return value if not any(FIELDS_BY_NAME["id"].check(value)) else None


def _unknown_field(name: str) -> Finding:
    return unknown_member("", name, list(FIELDS_BY_NAME))


def _field_findings(entry: Mapping[str, Any]) -> Iterator[tuple[str, Finding]]:
    refused: set[str] = set()  # fields with an error
    for name, value in entry.items():
        rule = FIELDS_BY_NAME.get(name)
        if rule is None:
            yield name, _unknown_field(name)
            continue
        for finding in rule.check(value):
            if finding.severity == "error":
                refused.add(name)
            yield name, finding
    for name in getattr(entry, "repeated", ()):
        message = f"field {render_value(name)} appears more than once; the last one wins"
        yield name, Finding("warning", message, "once", "more than once")
    for rule in FIELD_RULES:
        if rule.required and rule.name not in entry:
            yield rule.name, Finding("error", f"{rule.name} is required", rule.expected)
    if "data" in entry and not refused & {"data", "template"}:
        for finding in placeholder_findings(entry["data"], entry.get("template", False)):
            yield "data", finding
    yield from alternative_findings(entry)
    if "timezone" in entry and "cron" not in entry and "interval" in entry:
        got = render_value(entry["timezone"])
        yield (
            "timezone",
            Finding(
                "warning",
                f"timezone: applies to cron entries only; an interval entry ignores it, got {got}",
                "no timezone",
                got,
            ),
        )


def _unreadable_entry(
    position: int, element: document.UnreadableElement, first_seen: dict[str, int]
) -> _Checked:
    """A well-formed element that holds what JSON refuses: this entry is rejected (its last
    good version keeps running), the rest of the file is not."""
    entry_id = _usable_id(element.entry_id)
    if entry_id is not None:
        first_seen.setdefault(entry_id, position)
    message = f"{element.detail} (line {element.line}, column {element.column})"
    problem = Problem(
        "error",
        position,
        entry_id,
        element.field,
        message,
        line=element.line,
        column=element.column,
    )
    return _Checked(None, [problem], entry_id)


def _reused(
    position: int,
    located: document.Located,
    known: Mapping[str, PublishConfig],
    first_seen: dict[str, int],
) -> _Checked | None:
    """The running entry, when the file still holds the very text it was read from: checking
    that text again would find nothing and build an equal entry. A reload of a large file
    that changed in one place so checks one entry instead of all of them."""
    entry = located.value
    entry_id = entry.get("id") if isinstance(entry, dict) else None
    before = known.get(entry_id) if isinstance(entry_id, str) else None
    if before is None or before.source_key is None or before.source_key != located.fingerprint:
        return None
    if first_seen.setdefault(before.id, position) != position:
        return None  # a duplicate now: the full check says so
    return _Checked(before, [], before.id)


def _check_entry(position: int, located: document.Located, first_seen: dict[str, int]) -> _Checked:
    entry = located.value
    if isinstance(entry, document.UnreadableElement):
        return _unreadable_entry(position, entry, first_seen)
    where = {"line": located.line, "column": located.column}
    if not isinstance(entry, dict):
        got = render_value(entry)
        problem = Problem(
            "error",
            position,
            None,
            None,
            f"must be an object, got {got}",
            "an object",
            got,
            **where,
        )
        return _Checked(None, [problem], None)
    entry_id = _usable_id(entry.get("id"))
    findings = list(_field_findings(entry))
    if entry_id is not None and first_seen.setdefault(entry_id, position) != position:
        used, got = f"already used by entry {first_seen[entry_id]}", render_value(entry_id)
        findings.append(
            ("id", Finding("error", f"id must be unique, got {got} ({used})", "unique", got))
        )
    members = located.member_positions() if findings else {}
    problems = [
        Problem(
            f.severity,
            position,
            entry_id,
            name,
            f.message,
            f.expected,
            f.received,
            *members.get(name, (located.line, located.column)),
        )
        for name, f in findings
    ]
    if any(problem.severity == "error" for problem in problems):
        return _Checked(None, problems, entry_id)
    config = PublishConfig._from_checked(entry)  # every field was checked just above
    if not problems:
        object.__setattr__(config, "source_key", located.fingerprint)
    return _Checked(config, problems, entry_id)


PARSE_STEP: Final = 250  # entries parsed between two pauses of parse_config_steps


def parse_config(
    raw: bytes, *, source: str = "<config>", known: Mapping[str, PublishConfig] | None = None
) -> ConfigResult:
    """Validate the file's bytes (taking over the `known` entries whose text is unchanged, as
    parse_config_steps does); raises ConfigFileError only if it is not an entry list."""
    steps = parse_config_steps(raw, source=source, known=known)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: ConfigResult = done.value
            return result


def parse_config_steps(
    raw: bytes,
    *,
    source: str = "<config>",
    step: int = PARSE_STEP,
    known: Mapping[str, PublishConfig] | None = None,
) -> Generator[None, None, ConfigResult]:
    """parse_config in steps: pauses (yields) after every `step` entries and returns the
    result. The service's main loop parses a large file this way, a slice per turn, so its
    systemd watchdog pings and stop requests are not held up (docs/design.md).

    `known` are the entries in force: an element whose text is the one such an entry was read
    from is that entry again, without being checked a second time."""
    known = known or {}
    entries: list[PublishConfig] = []
    problems: list[Problem] = []
    invalid_ids: set[str] = set()
    first_seen: dict[str, int] = {}
    try:
        for position, entry in enumerate(document.located_elements(raw), start=1):
            if position % step == 0:
                yield
            checked = _reused(position, entry, known, first_seen) or _check_entry(
                position, entry, first_seen
            )
            problems.extend(checked.problems)
            if checked.config is not None:
                entries.append(checked.config)
            # A rejected duplicate must not mark the id: its first occurrence is running fine.
            elif checked.entry_id is not None and first_seen[checked.entry_id] == position:
                invalid_ids.add(checked.entry_id)
    except document.DocumentError as exc:
        raise ConfigFileError(source, exc.detail, line=exc.line, column=exc.column) from None
    return ConfigResult(tuple(entries), tuple(problems), frozenset(invalid_ids), config_digest(raw))


def config_digest(raw: bytes) -> str:
    """What tells two versions of the file apart (ConfigResult.digest)."""
    return hashlib.sha256(raw).hexdigest()


# --- the file on disk ------------------------------------------------------------------------


def _check_file_kind(path: Path, max_bytes: int) -> None:
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise ConfigFileError(str(path), "is a directory, not a config file")
    # A FIFO or device would block or never end; checked before open() for that reason.
    if not stat.S_ISREG(info.st_mode):
        raise ConfigFileError(str(path), "is not a regular file")
    if info.st_size > max_bytes:
        detail = f"is {info.st_size} bytes, larger than the {max_bytes}-byte limit"
        raise ConfigFileError(str(path), detail)


def read_config_file(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, at most `max_bytes`; raises ConfigFileError."""
    try:
        _check_file_kind(path, max_bytes)
        with path.open("rb") as stream:
            # One byte more than allowed tells "grew after stat()" from "exactly at the limit".
            raw = stream.read(max_bytes + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigFileError(str(path), f"cannot read config file: {reason}") from exc
    if len(raw) > max_bytes:
        raise ConfigFileError(str(path), f"is larger than the {max_bytes}-byte limit")
    return raw


def permission_warnings(path: Path) -> list[str]:
    """What makes the file writable by anyone on the machine: then anyone could change what the
    gateway publishes. A world-writable folder counts too (without the sticky bit anyone can
    replace the file; with it, only the owner can, which is still worth a word)."""
    found = []
    try:
        if path.stat().st_mode & stat.S_IWOTH:
            found.append(f"{path} is world-writable")
        folder = path.resolve().parent
        mode = folder.stat().st_mode
    except OSError:
        return found  # unreadable: the loader says so
    if mode & stat.S_IWOTH:
        sticky = " (sticky)" if mode & stat.S_ISVTX else ""
        found.append(f"its folder {folder} is world-writable{sticky}")
    return found


class ConfigurationLoader:
    """Reads and validates one config file. Holds only the path: building it does no I/O."""

    __slots__ = ("_max_bytes", "_path")

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self._path = Path(path)
        self._max_bytes = max_bytes

    @property
    def path(self) -> Path:
        return self._path

    def read(self) -> bytes:
        """The file's bytes, within the size limit; raises ConfigFileError."""
        return read_config_file(self._path, max_bytes=self._max_bytes)

    def load(self) -> ConfigResult:
        """Read and parse the file; raises ConfigFileError if it is unusable as a whole."""
        return parse_config(self.read(), source=str(self._path))

    def load_steps(
        self,
        raw: bytes,
        known: Mapping[str, PublishConfig] | None = None,
    ) -> Generator[None, None, ConfigResult]:
        """Parse bytes read with read() in steps (parse_config_steps, which reuses the `known`
        entries whose text did not change); raises ConfigFileError."""
        return parse_config_steps(raw, source=str(self._path), known=known)

    def load_configurations(self) -> list[PublishConfig]:
        """Only the valid entries; use load() to see the problems too."""
        return list(self.load().entries)
