"""`validate --format text|json|github` on real files: valid, invalid, unreadable, not JSON.

Run in-process (validate only reads a file and prints), with the output parsed back.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from scheduler_publisher.cli.main import main
from scheduler_publisher.cli.report import Report, as_github, terminal_safe
from scheduler_publisher.config.loader import ConfigResult, Problem
from tests.support import REPO, entry, write_config

SAMPLE = REPO / "JSON" / "payloadStaticConfig.json"
PROBLEM_KEYS = [
    "severity",
    "index",
    "id",
    "field",
    "path",
    "line",
    "column",
    "received",
    "expected",
    "message",
]
# Entry 2 starts on line 3; its bad fields are on lines 5 and 6, its unknown one on line 7.
INVALID = """[
  {"id": "ok", "topic": "site/ok", "data": {}, "interval": 1},
  {
    "id": "pump-7",
    "topic": "site/100%/+",
      "interval": 0,
    "colour": "red",
    "data": {"v": 1}
  }
]
"""


def validate(capsys: pytest.CaptureFixture[str], path: Path, *fmt: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(path), *fmt])
    code = exit_info.value.code
    out, err = capsys.readouterr()
    return (code if isinstance(code, int) else 0), out, err


@pytest.fixture
def invalid(tmp_path: Path) -> Path:
    path = tmp_path / "entries.json"
    path.write_text(INVALID, encoding="utf-8")
    return path


@pytest.fixture
def not_json(tmp_path: Path) -> Path:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "topic" "t"}\n]\n', encoding="utf-8")
    return path


# --- json ------------------------------------------------------------------------------------


def test_json_on_a_valid_file_is_valid_with_no_problems(capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file: exit 0 and one object saying valid, with its counts and no problems."""
    code, out, err = validate(capsys, SAMPLE, "--format", "json")
    assert code == 0
    assert err == ""
    assert json.loads(out) == {
        "file": str(SAMPLE),
        "valid": True,
        "valid_entries": 4,
        "errors": 0,
        "warnings": 0,
        "problems": [],
    }


def test_json_on_an_invalid_file_lists_every_problem_field_by_field(
    capsys: pytest.CaptureFixture[str], invalid: Path
) -> None:
    """Every problem has its entry index, id, JSON Pointer, the line and column of its field,
    what was received, what was expected and its severity; exit 1."""
    code, out, err = validate(capsys, invalid, "--format", "json")
    assert code == 1
    assert err == ""
    report = json.loads(out)
    assert {k: report[k] for k in ("file", "valid", "valid_entries", "errors", "warnings")} == {
        "file": str(invalid),
        "valid": False,
        "valid_entries": 1,
        "errors": 2,
        "warnings": 1,
    }
    topic, interval, colour = report["problems"]
    assert list(topic) == PROBLEM_KEYS
    assert topic == {
        "severity": "error",
        "index": 1,
        "id": "pump-7",
        "field": "topic",
        "path": "/1/topic",
        "line": 5,
        "column": 5,
        "received": '"site/100%/+"',
        "expected": 'free of the wildcards "+" and "#"',
        "message": 'entry 2 (id "pump-7"): topic must be free of the wildcards "+" and "#", '
        'got "site/100%/+"',
    }
    assert (interval["line"], interval["column"]) == (6, 7)
    assert (interval["received"], interval["expected"]) == ("0", "between 0.1 and 86400")
    assert colour["severity"] == "warning"
    assert (colour["field"], colour["path"], colour["line"]) == ("colour", "/1/colour", 7)
    assert colour["received"] == '"colour"'


def test_json_places_missing_fields_and_non_objects_at_the_entry(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A missing field has no place of its own: it is reported where its entry starts, with
    nothing received; so is an entry that is not an object."""
    path = tmp_path / "entries.json"
    path.write_text('[\n  {"id": "x", "topic": "t", "data": {}},\n    7\n]', encoding="utf-8")
    code, out, _ = validate(capsys, path, "--format", "json")
    assert code == 1
    missing, number = json.loads(out)["problems"]
    assert missing == {
        "severity": "error",
        "index": 0,
        "id": "x",
        "field": "interval",
        "path": "/0/interval",
        "line": 2,
        "column": 3,
        "received": None,
        "expected": "one of interval and cron",
        "message": 'entry 1 (id "x"): interval or cron is required (exactly one of them)',
    }
    assert {
        k: number[k]
        for k in ("index", "id", "field", "path", "line", "column", "received", "expected")
    } == {
        "index": 1,
        "id": None,
        "field": None,
        "path": "/1",
        "line": 3,
        "column": 5,
        "received": "7",
        "expected": "an object",
    }


def test_json_on_text_that_is_not_json_reports_a_located_file_error(
    capsys: pytest.CaptureFixture[str], not_json: Path
) -> None:
    """A syntax error is one file-level problem, at json's line and column; exit 1."""
    code, out, _ = validate(capsys, not_json, "--format", "json")
    assert code == 1
    report = json.loads(out)
    assert (report["valid"], report["errors"], report["valid_entries"]) == (False, 1, 0)
    (problem,) = report["problems"]
    assert problem == {
        "severity": "error",
        "index": None,
        "id": None,
        "field": None,
        "path": "",
        "line": 3,
        "column": 12,
        "received": None,
        "expected": None,
        "message": "not valid JSON: Expecting ':' delimiter at line 3, column 12",
    }


def test_json_on_invalid_utf8_reports_the_line_and_column(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Bytes that are not UTF-8 are a file-level problem with the line and the column (in
    characters) where they start."""
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n  {"id": "\xc3\xa9t\xe9"}\n]')
    code, out, _ = validate(capsys, path, "--format", "json")
    assert code == 1
    (problem,) = json.loads(out)["problems"]
    assert (problem["line"], problem["column"]) == (2, 13)
    assert problem["message"] == "not valid UTF-8 at byte offset 15"


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_json_on_an_unreadable_file_reports_it_without_a_place(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str
) -> None:
    """A missing file or a directory: one file-level problem, no line; exit 1, stdout only."""
    path = tmp_path / "entries.json"
    if kind == "directory":
        path.mkdir()
    code, out, err = validate(capsys, path, "--format", "json")
    assert code == 1
    assert err == ""
    (problem,) = json.loads(out)["problems"]
    assert (problem["line"], problem["column"], problem["path"]) == (None, None, "")
    expected = "No such file" if kind == "missing" else "is a directory"
    assert expected in problem["message"]


# --- github ----------------------------------------------------------------------------------


def test_github_annotates_each_problem_on_its_line(
    capsys: pytest.CaptureFixture[str], invalid: Path
) -> None:
    """One ::error/::warning command per problem at its line and column, % escaped in the
    message; the summary follows; exit 1."""
    code, out, err = validate(capsys, invalid, "--format", "github")
    assert code == 1
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == (
        f"::error file={invalid},line=5,col=5,title=scheduler-publisher::entry 2 (id "
        f'"pump-7"): topic must be free of the wildcards "+" and "#", got "site/100%25/+"'
    )
    assert lines[1].startswith(f"::error file={invalid},line=6,col=7,title=")
    assert lines[2].startswith(f"::warning file={invalid},line=7,col=5,title=")
    token = lines[3].removeprefix("::stop-commands::")
    assert lines[4:] == [
        f"{invalid}: invalid: 1 valid entries, 2 errors, 1 warnings",
        f"::{token}::",
    ]


def test_github_escapes_the_file_name_as_a_property(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A file name with ",", ":", "%" and a newline cannot break the command's properties."""
    path = tmp_path / "odd,name:100%\n.json"
    path.write_text('[{"id": "a", "topic": "t", "data": {}, "interval": 0}]', encoding="utf-8")
    code, out, _ = validate(capsys, path, "--format", "github")
    assert code == 1
    escaped = str(tmp_path).replace("%", "%25").replace(":", "%3A").replace(",", "%2C")
    assert out.startswith(
        f"::error file={escaped}/odd%2Cname%3A100%25%0A.json,line=1,col=40,"
        "title=scheduler-publisher::entry 1"
    )


def test_github_on_text_that_is_not_json_annotates_the_break(
    capsys: pytest.CaptureFixture[str], not_json: Path
) -> None:
    """A syntax error is annotated at json's line and column."""
    code, out, _ = validate(capsys, not_json, "--format", "github")
    assert code == 1
    assert out.splitlines()[0] == (
        f"::error file={not_json},line=3,col=12,title=scheduler-publisher::not valid JSON: "
        "Expecting ':' delimiter at line 3, column 12"
    )


def test_github_on_an_unreadable_file_annotates_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A missing file gets a file-level annotation (no line)."""
    path = tmp_path / "absent.json"
    code, out, _ = validate(capsys, path, "--format", "github")
    assert code == 1
    assert out.splitlines()[0].startswith(
        f"::error file={path},title=scheduler-publisher::cannot read config file: "
    )


def test_github_on_a_valid_file_prints_only_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file: no annotation, the summary with commands stopped around it, exit 0."""
    code, out, _ = validate(capsys, SAMPLE, "--format", "github")
    assert code == 0
    first, summary, last = out.splitlines()
    token = first.removeprefix("::stop-commands::")
    assert len(token) == 32
    assert summary == f"{SAMPLE}: valid: 4 valid entries, 0 errors, 0 warnings"
    assert last == f"::{token}::"
    assert github_commands(out) == []


def test_github_stop_token_is_new_at_every_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The token that resumes commands cannot be written into the file in advance."""
    firsts = {validate(capsys, SAMPLE, "--format", "github")[1].splitlines()[0] for _ in range(3)}
    assert len(firsts) == 3


def test_github_message_escapes_percent_cr_and_lf() -> None:
    """The message escapes %, CR and LF; properties also ":" and ","."""
    problem = Problem("warning", None, None, None, "50% a\r\nb: c, d", line=2, column=1)
    report = Report("x:y,z.json", ConfigResult((), (problem,), frozenset(), digest=""))
    assert list(as_github(report, "T")) == [
        "::warning file=x%3Ay%2Cz.json,line=2,col=1,title=scheduler-publisher::"
        "50%25 a%0D%0Ab: c, d",
        "::stop-commands::T",
        "x:y,z.json: valid: 0 valid entries, 0 errors, 1 warnings",
        "::T::",
    ]


# --- text ------------------------------------------------------------------------------------


def test_text_prints_file_line_column_for_each_problem(
    capsys: pytest.CaptureFixture[str], invalid: Path
) -> None:
    """Problems go to stderr as file:line:column: severity: problem; the verdict to stdout."""
    code, out, err = validate(capsys, invalid)
    assert code == 1
    assert err.splitlines() == [
        f'{invalid}:5:5: error: entry 2 (id "pump-7"): topic must be free of the wildcards '
        f'"+" and "#", got "site/100%/+"',
        f'{invalid}:6:7: error: entry 2 (id "pump-7"): interval must be between 0.1 and 86400, '
        "got 0",
        f'{invalid}:7:5: warning: entry 2 (id "pump-7"): unknown field "colour" is ignored',
    ]
    assert out == f"{invalid}: invalid: 1 valid entries, 2 errors, 1 warnings\n"


def test_text_on_text_that_is_not_json_names_the_place_and_a_hint(
    capsys: pytest.CaptureFixture[str], not_json: Path
) -> None:
    """A syntax error: file:line:column, then how to check the file again."""
    code, _, err = validate(capsys, not_json)
    assert code == 1
    first, hint = err.splitlines()
    assert first == (
        f"{not_json}:3:12: error: not valid JSON: Expecting ':' delimiter at line 3, column 12"
    )
    assert "scheduler-publisher validate --config" in hint


def test_text_on_a_directory_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A directory where the file should be: a file-level error without a place; exit 1."""
    code, _, err = validate(capsys, tmp_path)
    assert code == 1
    assert err.splitlines()[0] == f"{tmp_path}: error: is a directory, not a config file"


def test_format_is_not_read_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--format is about one invocation: SCHEDULER_PUBLISHER_FORMAT does not change it."""
    monkeypatch.setitem(os.environ, "SCHEDULER_PUBLISHER_FORMAT", "json")
    code, out, _ = validate(capsys, SAMPLE)
    assert code == 0
    assert out.startswith(f"{SAMPLE}: valid:")


def test_unknown_format_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A format that does not exist: exit 2, naming the choices."""
    code, _, err = validate(capsys, SAMPLE, "--format", "xml")
    assert code == 2
    assert "text" in err
    assert "github" in err


# --- hostile ids and file names, in every format ---------------------------------------------

# What an entries file could use to forge a workflow command or drive a terminal: each is a
# valid entry id (an id may hold any character but a lone surrogate).
HOSTILE_IDS = [
    "\n::error file=FORGED.py,line=1::forged by an id",
    "x\n::add-mask::secret",
    "::add-mask::secret",  # a line of its own would start with "::"
    "  ::warning::indented",
    "##[add-mask]secret",  # the runner's first syntax, found anywhere in a line
    "\r::warning::after a carriage return",
    "\u2028::error::after a line separator",
    "\x1b[31mred\x1b[0m\x1b]0;title\x07",
    "\x9b2J",  # C1 CSI: an ANSI escape in one character
    "\u202egnp.exe",
    "tab\there\x7f",
    "%0A::error::percent",
    '"quoted"',
    " padded ",
    "plain-id",
]
HOSTILE_NAME = "e\n::error file=NAME.py,line=1::name\x1b[2J\u202e##[add-mask]n\udcff.json"
# GitHub's runner: the commands it knows (actions/runner, src/Runner.Worker).
RUNNER_COMMANDS = frozenset(
    (
        *("error", "warning", "notice", "debug", "add-mask", "set-output", "set-env"),
        *("add-path", "save-state", "group", "endgroup", "echo", "add-matcher"),
        *("remove-matcher", "stop-commands"),
    )
)
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _runner_parse(line: str, known: set[str]) -> tuple[str, dict[str, str], str] | None:
    """One line as actions/runner's ActionCommand reads it: `::name k=v,...::data` after
    leading blanks (TryParseV2), else `##[name k=v;...]data` anywhere (TryParse)."""
    v2 = re.fullmatch(r"::([^ :]*)(?: ([^:]*))?::(.*)", line.lstrip(), re.DOTALL)
    if v2 is not None and v2[1].lower() in known:
        pairs = [p.split("=", 1) for p in (v2[2] or "").split(",") if "=" in p]
        unescape = {"%0D": "\r", "%0A": "\n", "%3A": ":", "%2C": ",", "%25": "%"}
        props = {k: re.sub("%0D|%0A|%3A|%2C|%25", lambda m: unescape[m[0]], v) for k, v in pairs}
        return v2[1].lower(), props, v2[3]
    v1 = re.search(r"##\[([^ \]]*)[^\]]*\](.*)", line, re.DOTALL)
    if v1 is not None and v1[1].lower() in known:
        return v1[1].lower(), {}, v1[2]
    return None


def github_commands(output: str) -> list[tuple[str, dict[str, str], str]]:
    """The workflow commands GitHub's runner acts on in `output` (stdout and stderr are read
    alike): lines split at CR, LF or CRLF; after `::stop-commands::T` nothing but `::T::`."""
    acted: list[tuple[str, dict[str, str], str]] = []
    stopped: str | None = None
    for line in re.split(r"\r\n|\r|\n", output):
        known = set(RUNNER_COMMANDS) | ({stopped.lower()} if stopped else set())
        found = _runner_parse(line, known)
        if found is None:
            continue
        if stopped is not None:
            stopped = None if found[0] == stopped.lower() else stopped
        elif found[0] == "stop-commands":
            stopped = found[2]
        else:
            acted.append(found)
    return acted


def unsafe_characters(text: str) -> list[str]:
    """What a terminal would act on (controls, line separators, bidi controls, surrogates),
    newlines between lines aside."""
    return [
        c
        for c in text.replace("\n", "")
        if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI
    ]


def read_back(shown: str) -> str:
    """A name as a line of text shows it: a JSON string when quoted, else as it is."""
    return str(json.loads(shown)) if shown.startswith('"') else shown


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A valid file of hostile ids (one of them a cron entry), a hostile unknown field and a
    hostile invalid entry, under a hostile name."""
    entries: list[dict[str, Any]] = [
        entry(entry_id, f"t/{n}") for n, entry_id in enumerate(HOSTILE_IDS)
    ]
    entries[0] = {"id": HOSTILE_IDS[0], "topic": "t/0", "data": {}, "cron": "0 * * * *"}
    entries[1]["\n::add-mask::field\x1b[1m"] = 1  # an unknown field: a warning
    entries.append(entry("\n::error file=BAD.py::\x1b[31m", "t/bad", qos=7))  # an error
    path = tmp_path / HOSTILE_NAME
    write_config(path, entries)
    return path


def test_github_acts_on_no_command_from_the_file_or_its_name(
    capsys: pytest.CaptureFixture[str], hostile: Path
) -> None:
    """Ids, field names and the file name that hold workflow commands (`::` after a line
    break, `##[` anywhere, CR, U+2028) forge none: the runner acts on one annotation per
    problem, each on the file, and reads no control character from any line."""
    _, as_json, _ = validate(capsys, hostile, "--format", "json", "--options-file", "")
    problems = json.loads(as_json)["problems"]
    code, out, err = validate(
        capsys, hostile, "--format", "github", "--shard", "1/1", "--options-file", ""
    )
    assert code == 1
    # The file property is the name with GitHub's escapes undone, and what a terminal would
    # act on still escaped (\\u001b): such a name cannot be a file of a repository's checkout.
    named = terminal_safe(str(hostile).replace("\n", "%0A")).replace("%0A", "\n")
    acted = github_commands(out + err)
    assert [(name, props["file"], props["line"]) for name, props, _ in acted] == [
        (problem["severity"], named, str(problem["line"])) for problem in problems
    ]
    assert [problem["severity"] for problem in problems] == ["warning", "error"]
    assert unsafe_characters(out + err) == []


def test_github_lists_the_shard_ids_so_they_read_back(
    capsys: pytest.CaptureFixture[str], hostile: Path
) -> None:
    """Between the stop and the resume, the summary names the file and the shard's lines
    list its ids, each quoted as a JSON string when it is not plain, so they read back."""
    _, out, _ = validate(
        capsys, hostile, "--format", "github", "--shard", "1/1", "--options-file", ""
    )
    lines = out.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("::stop-commands::"))
    summary, header, *listed, resume, _ = lines[start + 1 :]
    name, end = json.JSONDecoder().raw_decode(summary)
    assert (name, summary[end:]) == (
        str(hostile),
        ": invalid: 15 valid entries, 1 errors, 1 warnings",
    )
    assert header == "shard 1/1 runs 15 of 15 valid entries:"
    assert [read_back(line.removeprefix("  ")) for line in listed] == HOSTILE_IDS
    assert resume == lines[start].replace("::stop-commands::", "::") + "::"


def test_text_passes_no_control_character_to_the_terminal(
    capsys: pytest.CaptureFixture[str], hostile: Path
) -> None:
    """The text format shows hostile ids, field names and the file name escaped, on stdout
    and stderr; the shard's ids and the cron entry's id read back."""
    code, out, err = validate(capsys, hostile, "--shard", "1/1", "--options-file", "")
    assert code == 1
    assert unsafe_characters(out + err) == []
    problems = err.splitlines()
    assert [json.JSONDecoder().raw_decode(line)[0] for line in problems] == [str(hostile)] * 2
    summary, _, *listed, cron = out.splitlines()
    assert json.JSONDecoder().raw_decode(summary)[0] == str(hostile)
    assert [read_back(line.removeprefix("  ")) for line in listed] == HOSTILE_IDS
    cron_id = json.JSONDecoder().raw_decode(cron.split(": id ", 1)[1])[0]
    assert cron_id == HOSTILE_IDS[0]


def test_text_shows_a_missing_hostile_file_escaped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A file that cannot be read: the error and the hint name it escaped too."""
    code, _, err = validate(capsys, tmp_path / HOSTILE_NAME, "--options-file", "")
    assert code == 1
    assert len(err.splitlines()) == 2
    assert unsafe_characters(err) == []


def test_json_escapes_what_a_terminal_would_act_on(
    capsys: pytest.CaptureFixture[str], hostile: Path
) -> None:
    """The JSON document holds no raw control, bidi or surrogate character, and still reads
    back to the exact file name, ids and field names."""
    code, out, _ = validate(
        capsys, hostile, "--format", "json", "--shard", "1/1", "--options-file", ""
    )
    assert code == 1
    assert unsafe_characters(out) == []
    body = json.loads(out)
    assert body["file"] == str(hostile)
    assert body["shard"]["entries"] == HOSTILE_IDS
    assert [c["id"] for c in body["cron_entries"]] == [HOSTILE_IDS[0]]
    assert body["problems"][0]["field"] == "\n::add-mask::field\x1b[1m"


def test_github_acts_on_no_command_from_an_options_file_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An options file whose key holds a command (`##[` is read anywhere in a line): the usage
    error on stderr is shown between a stop and its resume, and the runner acts on nothing."""
    opts = tmp_path / "o.toml"
    opts.write_text('"##[add-mask]secret\\n::add-mask::x" = 1\n', encoding="utf-8")
    code, out, err = validate(capsys, SAMPLE, "--format", "github", "--options-file", str(opts))
    assert (code, out) == (2, "")
    assert github_commands(err) == []
    assert "unknown option" in err.splitlines()[1]
    assert unsafe_characters(err) == []
