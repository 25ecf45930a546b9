"""What `validate` prints: a config's problems as text for people, one JSON object for
programs, or GitHub Actions annotations that land on the file's lines in a pull request.

Pure: each renderer takes the outcome (a ConfigResult, or the ConfigFileError that stopped the
read) and returns the text; main.py prints it and picks the exit code.

Everything the entries file or its name controls (ids, values, the path) is printed escaped,
in every format: a terminal never receives a control character, an ANSI escape or a bidi
override from it (`terminal_safe`), and GitHub's runner never reads a workflow command in it
(`as_github`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from scheduler_publisher.config.loader import (
    ConfigFileError,
    ConfigResult,
    Problem,
    PublishConfig,
    Severity,
)
from scheduler_publisher.config.shard import Shard

__all__ = [
    "FORMATS",
    "Format",
    "Report",
    "as_github",
    "as_json",
    "as_text",
    "github_plain",
    "render",
    "shard_lines",
    "summary",
    "terminal_safe",
]

Format = Literal["text", "json", "github"]
FORMATS: Final[tuple[Format, ...]] = ("text", "json", "github")

# What a terminal acts on instead of showing: C0 and C1 controls (ESC starts ANSI escapes,
# U+009B is a one-character CSI, CR and LF start new lines), DEL, the line and paragraph
# separators, the bidirectional marks, embeddings, overrides and isolates (they reorder the
# text around them: "Trojan Source"), and lone surrogates (argv bytes that were not UTF-8:
# printing one raises UnicodeEncodeError).
_UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def terminal_safe(text: str) -> str:
    """`text` with each unsafe character as its JSON escape (`\\u001b`): inside a JSON string
    that is the same string, and elsewhere it shows what was there."""
    return _UNSAFE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def shown(name: str) -> str:
    """A name from the file or the command line (a path, an id) as printed in a line of text:
    as it is when it is plain, else as a JSON string with every unsafe character escaped, so
    that no two names look alike and none can pass for more than one."""
    plain = name == name.strip() and not name.startswith('"') and not _UNSAFE.search(name)
    return name if name and plain else terminal_safe(json.dumps(name, ensure_ascii=False))


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome of validating one file: its result, or why it could not be read at all."""

    file: str
    result: ConfigResult | None
    failure: ConfigFileError | None = None
    shard: Shard | None = None  # validate --shard: also say which entries this shard runs
    # When the report was made: each cron entry's next slot is shown from it.
    now: datetime | None = None

    @property
    def cron_entries(self) -> tuple[PublishConfig, ...]:
        entries = self.result.entries if self.result is not None else ()
        return tuple(entry for entry in entries if entry.cron is not None)

    def next_slot(self, entry: PublishConfig) -> datetime | None:
        """A cron entry's next slot after `now` (None without `now`, or past its last)."""
        if self.now is None or entry.cron is None:
            return None
        # Only here: the CLI's import loads no scheduler (scheduler_publisher/cron.py).
        from scheduler_publisher.config.cron_slots import cron_slots  # noqa: PLC0415

        slots = cron_slots(entry.cron, entry.timezone)
        following = slots.slot_after(self.now)
        return None if following is None else slots.local(following)

    @property
    def problems(self) -> tuple[Problem, ...]:
        if self.failure is not None:
            return (
                Problem(
                    "error",
                    None,
                    None,
                    None,
                    self.failure.detail,
                    line=self.failure.line,
                    column=self.failure.column,
                ),
            )
        return self.result.problems if self.result is not None else ()

    def count(self, severity: Severity) -> int:
        return sum(problem.severity == severity for problem in self.problems)

    @property
    def valid(self) -> bool:
        return self.count("error") == 0

    @property
    def valid_entries(self) -> int:
        return len(self.result.entries) if self.result is not None else 0

    @property
    def shard_entries(self) -> tuple[str, ...]:
        """The ids of the valid entries the shard runs, in file order (every valid entry is
        checked: an invalid one is reported whichever shard it would belong to)."""
        if self.result is None or self.shard is None:
            return ()
        return tuple(e.id for e in self.result.entries if self.shard.owns(e.id))


def _pointer(problem: Problem) -> str:
    """The RFC 6901 JSON Pointer to what the problem is about ("" is the whole file)."""
    if problem.position is None:
        return ""
    steps = [str(problem.position - 1)]
    if problem.field is not None:
        steps.append(problem.field.replace("~", "~0").replace("/", "~1"))
    return "/" + "/".join(steps)


def _problem_object(problem: Problem) -> dict[str, Any]:
    return {
        "severity": problem.severity,
        "index": None if problem.position is None else problem.position - 1,
        "id": problem.entry_id,
        "field": problem.field,
        "path": _pointer(problem),
        "line": problem.line,
        "column": problem.column,
        "received": problem.received,
        "expected": problem.expected,
        "message": str(problem),
    }


def as_json(report: Report) -> str:
    """One JSON object: the file, its verdict, the counts and every problem in file order."""
    body = {
        "file": report.file,
        "valid": report.valid,
        "valid_entries": report.valid_entries,
        "errors": report.count("error"),
        "warnings": report.count("warning"),
        "problems": [_problem_object(problem) for problem in report.problems],
    }
    if report.shard is not None:
        body["shard"] = {
            "k": report.shard.k,
            "n": report.shard.n,
            "name": report.shard.name,
            "entries": list(report.shard_entries),
        }
    if report.cron_entries:  # only then: a file without any keeps the document it had
        body["cron_entries"] = [_cron_object(report, entry) for entry in report.cron_entries]
    # json escapes C0 controls, so a raw newline is indentation; what it leaves raw (C1,
    # bidi, lone surrogates) can only be inside strings, where terminal_safe's escapes are
    # JSON's own: the same document.
    text = json.dumps(body, ensure_ascii=False, indent=2)
    return "\n".join(terminal_safe(line) for line in text.split("\n"))


def _cron_object(report: Report, entry: PublishConfig) -> dict[str, Any]:
    following = report.next_slot(entry)
    return {
        "id": entry.id,
        "cron": entry.cron,
        "timezone": entry.timezone,
        "next_run_at": following.isoformat() if following else None,
    }


def cron_lines(report: Report) -> Iterator[str]:
    """One line per valid cron entry: its schedule and next slot, to check how CronTrigger
    read the expression (weekdays, time zone) before it runs."""
    for entry in report.cron_entries:
        following = report.next_slot(entry)
        after = f", next slot {following.isoformat()}" if following else ""
        named = json.dumps(entry.id, ensure_ascii=False)
        yield terminal_safe(f"{shown(report.file)}: id {named}: {entry.schedule}{after}")


def summary(report: Report) -> str:
    verdict = "valid" if report.valid else "invalid"
    return (
        f"{shown(report.file)}: {verdict}: {report.valid_entries} valid entries, "
        f"{report.count('error')} errors, {report.count('warning')} warnings"
    )


def shard_lines(report: Report) -> list[str]:
    """`shard K/N runs X of Y valid entries:` and then their ids, one per line; nothing
    without --shard."""
    if report.shard is None or report.result is None:
        return []
    ids = report.shard_entries
    return [
        f"shard {report.shard} runs {len(ids)} of {report.valid_entries} valid entries"
        f"{':' if ids else ''}",
        *(f"  {shown(entry_id)}" for entry_id in ids),
    ]


def _place(file: str, problem: Problem) -> str:
    if problem.line is None:
        return shown(file)
    return f"{shown(file)}:{problem.line}:{problem.column}"


def as_text(report: Report) -> Iterator[str]:
    """`file:line:column: severity: problem` lines, the compilers' form editors jump to."""
    for problem in report.problems:
        yield terminal_safe(f"{_place(report.file, problem)}: {problem.severity}: {problem}")


# GitHub's workflow-command escaping (actions/toolkit, packages/core/src/command.ts): the
# message escapes %, CR and LF; a property value escapes ":" and "," too. What is left unsafe
# for a terminal (the runner's log shows ANSI colours) is then escaped as in the text format.
_DATA_ESCAPES: Final = {ord("%"): "%25", ord("\r"): "%0D", ord("\n"): "%0A"}
_PROPERTY_ESCAPES: Final = {**_DATA_ESCAPES, ord(":"): "%3A", ord(","): "%2C"}


def _annotation(file: str, problem: Problem) -> str:
    properties = {
        "file": file,
        "line": problem.line,
        "col": problem.column,
        "title": "scheduler-publisher",
    }
    shown_properties = ",".join(
        f"{key}={terminal_safe(str(value).translate(_PROPERTY_ESCAPES))}"
        for key, value in properties.items()
        if value is not None
    )
    message = terminal_safe(str(problem).translate(_DATA_ESCAPES))
    return f"::{problem.severity} {shown_properties}::{message}"


def as_github(report: Report, stop_token: str) -> Iterator[str]:
    """One `::error` or `::warning` workflow command per problem, at its line and column; then
    the verdict and the shard's entries as plain lines, with the runner's command processing
    stopped around them.

    GitHub's runner reads a command in any line that starts with `::` after blanks, and in
    any line that holds `##[` anywhere (its first syntax), on stdout and stderr alike. An id
    or a path may be either, and no escape exists for a plain line, so those lines go between
    `::stop-commands::<token>` and `::<token>::`, GitHub's way to log anything: commands are
    ignored until the token, which the file cannot guess (`render` makes a random one)."""
    for problem in report.problems:
        yield _annotation(report.file, problem)
    yield from github_plain([summary(report), *shard_lines(report)], stop_token)


def github_plain(lines: list[str], stop_token: str | None = None) -> list[str]:
    """`lines` for GitHub's runner to show and not act on (see as_github); by default with a
    new random token."""
    token = stop_token or secrets.token_hex(16)
    return [f"::stop-commands::{token}", *lines, f"::{token}::"]


def render(
    report: Report, output: Format, *, stop_token: str | None = None
) -> tuple[list[str], list[str]]:
    """(stdout lines, stderr lines) for `output`. Text keeps problems on stderr and the
    verdict on stdout, as before; machine formats put everything on stdout. `stop_token`
    (github only) is for tests; by default each call makes a new random one."""
    if output == "json":
        return [as_json(report)], []
    if output == "github":
        return list(as_github(report, stop_token or secrets.token_hex(16))), []
    return [summary(report), *shard_lines(report), *cron_lines(report)], list(as_text(report))
