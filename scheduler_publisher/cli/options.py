"""Where each option's value comes from: a flag, the environment, the options file or a default.

Precedence: flag > `SCHEDULER_PUBLISHER_<OPTION>` > options file (TOML) > default. Nothing here
lists the options: the mechanism walks the argparse actions of the `run` parser, so a flag added
there is at once an environment variable, an options-file key and a line of `show-options`.
Every value passes through the flag's own `type` (which carries its range check), whichever
source it came from. Problems raise OptionsError (the CLI exits 2).

argparse has no public API to list a parser's actions or tell their kinds, so this module reads
`parser._actions` and checks for `argparse._StoreTrueAction`; both have been stable since
Python 3.2 and are what argparse's own help formatter uses.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scheduler_publisher.cli.report import shown
from scheduler_publisher.config.rules import FIELDS_BY_NAME
from scheduler_publisher.config.shard import Shard, ShardError, parse_shard
from scheduler_publisher.endpoints import EndpointError, parse_list

ENV_PREFIX = "SCHEDULER_PUBLISHER_"
OPTIONS_FILE_ENV = f"{ENV_PREFIX}OPTIONS_FILE"
DEFAULT_OPTIONS_FILE = Path("/etc/scheduler-publisher/scheduler-publisher.toml")
SECRET_OPTIONS = frozenset({"password"})
# An options file is a few dozen lines; the limit keeps /dev/zero-like files out of memory.
MAX_OPTIONS_FILE_BYTES = 1 << 20
_FILE_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
}
# A key at the start of a line, bare or quoted, before its "=" (only for naming a duplicate).
_TOP_LEVEL_KEY = re.compile(r"^[ \t]*([A-Za-z0-9_-]+|\"[^\"\\\n]*\"|'[^'\n]*')[ \t]*=", re.M)
# Set by other MQTT tools and images; this service never read them. Named so that a gateway
# which sets one learns the variable it meant instead of silently talking to localhost.
FOREIGN_ENV = {
    "MQTT_BROKER": "broker",
    "MQTT_HOST": "broker",
    "MQTT_PORT": "port",
    "MQTT_USERNAME": "username",
    "MQTT_USER": "username",
}
# Two ways to give one value: the one from the stronger source wins, so a `--password-file`
# flag is not overridden by a `password` key in the options file.
ALTERNATIVES = (("password", "password-file"),)
# Options whose value is a comma-separated list: the options file may give a TOML array.
ARRAY_OPTIONS = frozenset({"broker", "tls-alpn"})
# An ALPN protocol id: 1 to 255 bytes (RFC 7301), printable ASCII without "," (the separator).
_ALPN = re.compile(r"[!-+\--~]{1,255}")
# Not options of the service, so not read from the file or shown; --options-file is read
# from the environment by hand (the file cannot name itself).
_NOT_OPTIONS = frozenset({"help", "version", "options_file"})
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # ASCII: what a Host header carries
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})

Source = Literal["flag", "env", "file", "default"]
_RANK: dict[Source, int] = {"flag": 3, "env": 2, "file": 1, "default": 0}


class OptionsError(Exception):
    """An option value or the options file cannot be used (a usage error, exit 2)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an option's effective value came from: `where` names the flag, variable or file."""

    source: Source
    where: str = ""

    def __str__(self) -> str:
        return f"{self.source} {self.where}".strip()


@dataclass(frozen=True, slots=True)
class Option:
    """One long flag of the `run` parser, seen as a setting with a name, a variable and a kind."""

    name: str  # the long flag without "--"; also the options-file key
    action: argparse.Action

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def is_switch(self) -> bool:
        return isinstance(self.action, argparse._StoreTrueAction | argparse._StoreFalseAction)

    @property
    def kind(self) -> Literal["boolean", "integer", "number", "string"]:
        if self.is_switch:
            return "boolean"
        declared = getattr(self.action.type, "kind", self.action.type)
        return "integer" if declared is int else "number" if declared is float else "string"


# Numbers from a flag or a variable: ASCII digits, a minus sign and, in a float, a point and an
# exponent. Python's int() and float() also take blanks around, "_" between digits, other
# scripts' digits ("١٨٨٣"), "+", "inf" and "nan"; the options file's TOML takes none of
# those as a string, so neither do the other sources.
_INTEGER_TEXT = re.compile(r"-?[0-9]+")
_FLOAT_TEXT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_MAX_DIGITS = 30  # far beyond any range below, and far below int()'s 4,300-digit limit
_SHOWN_LIMIT = 60


@dataclass(frozen=True, slots=True)
class Number:
    """An argparse `type` for a number in a range; the message names the range and the value.
    Takes text (a flag or a variable) or a number as TOML gave it."""

    kind: type[int] | type[float]
    low: float
    high: float | None = None
    low_open: bool = False  # True: the value must be larger than `low`, not equal to it
    words: tuple[str, ...] = ()  # also accepted, as themselves ("auto")

    def __call__(self, given: str | float) -> int | float | str:
        if isinstance(given, str) and given in self.words:
            return given
        # What the message shows: the text as given (it passed the grammar), or the number
        received = given if isinstance(given, str) else shown_number(given)
        try:
            value = self.kind(self._parse(given) if isinstance(given, str) else given)
        except OverflowError:  # an integer beyond float's range, from TOML
            raise argparse.ArgumentTypeError(f"must be {self.expected()}, got {received}") from None
        too_low = value <= self.low if self.low_open else value < self.low
        # isfinite() only for floats: it would convert a 4,000-digit TOML integer to one
        infinite = isinstance(value, float) and not math.isfinite(value)
        if infinite or too_low or (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"must be {self.expected()}, got {received}")
        return value

    def _parse(self, text: str) -> int | float:
        grammar = _INTEGER_TEXT if self.kind is int else _FLOAT_TEXT
        if not grammar.fullmatch(text):
            raise argparse.ArgumentTypeError(f"must be {self.expected()}, got {shown_text(text)}")
        if len(text) > _MAX_DIGITS:
            raise argparse.ArgumentTypeError(
                f"must be {self.expected()}, got a number of {len(text)} characters"
            )
        return self.kind(text)

    def expected(self) -> str:
        return self._range() + "".join(f" or {word!r}" for word in self.words)

    def _range(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        low = _plain(self.low)
        at_least = f"larger than {low}" if self.low_open else f"at least {low}"
        if self.high is None:
            return f"{noun} {at_least}"
        if self.low_open:
            return f"{noun} {at_least} and at most {_plain(self.high)}"
        return f"{noun} from {low} to {_plain(self.high)}"


def shown_text(text: str) -> str:
    """Text received, for a message: quoted with its control characters escaped (repr), and
    cut to 60 characters (an environment variable can hold 100,000)."""
    quoted = repr(text)
    return quoted if len(quoted) <= _SHOWN_LIMIT else quoted[: _SHOWN_LIMIT - 4] + "...'"


def shown_number(value: float) -> str:
    """A number received, for a message: as written, unless it has too many digits to print."""
    if isinstance(value, int) and abs(value) >= 10**_MAX_DIGITS:
        # TOML's integers stop at int()'s 4,300-digit limit, so str() can print this one
        return f"an integer of {len(str(abs(value)))} digits"
    return str(value)


def _plain(number: float) -> str:
    """1000000000 rather than 1e+09, 0.1 rather than 0.1000000000000000055."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _control_free(text: str) -> bool:
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\ufffe\uffff" for c in text)


def _utf8_length(text: str) -> int | None:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: argv bytes that were not UTF-8
        return None


def mqtt_topic(text: str) -> str:
    """An argparse `type` for a topic the service publishes to: an entry's topic rule
    (rules.py), and no "$" topic at all, since brokers reserve those."""
    problems = [f.message for f in FIELDS_BY_NAME["topic"].check(text) if f.severity == "error"]
    if not problems and text.startswith("$"):
        problems.append(
            f'topic must not start with "$" (brokers reserve those topics), got {text!r}'
        )
    if problems:
        raise argparse.ArgumentTypeError("; ".join(problems))
    return text


def mqtt_string(text: str) -> str:
    """An argparse `type` for a client id or user name: non-empty, printable, MQTT-sized."""
    size = _utf8_length(text)
    if not text or size is None or not _control_free(text):
        raise argparse.ArgumentTypeError(
            f"must be non-empty valid UTF-8 without control characters, got {text!r}"
        )
    if size > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535 UTF-8 bytes, got {size}")
    return text


def host_name(text: str) -> str:
    """An argparse `type` for a host name or address: non-empty, no spaces or control chars."""
    if not text or any(c.isspace() for c in text) or not _control_free(text):
        raise argparse.ArgumentTypeError(
            f"must be a host name or IP address without spaces, got {text!r}"
        )
    return text


def broker_list(text: str) -> str:
    """An argparse `type` for `--broker`: one broker or several, comma-separated (endpoints.py's
    grammar). Kept as text, without blanks around the commas; cli/arguments.py resolves it
    against --port and --tls once every source is merged."""
    try:
        given = parse_list(text)
    except EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return ",".join(g.text for g in given)


def alpn_list(text: str) -> str:
    """An argparse `type` for `--tls-alpn`: ALPN protocol ids separated by commas."""
    names = [name.strip() for name in text.split(",")]
    if not all(_ALPN.fullmatch(name) for name in names):
        raise argparse.ArgumentTypeError(
            "must be ALPN protocol names (printable ASCII, 1 to 255 characters each) "
            f"separated by commas, got {shown_text(text)}"
        )
    return ",".join(names)


def host_names(text: str) -> str:
    """An argparse `type` for `--http-allowed-hosts`: host names separated by commas, `*`
    (any), or '' (none). Kept as text, normalised (lower case, no spaces), so that
    show-options and the options file show it as it reads."""
    if text == "":
        return text  # no list
    names = [name.strip().lower().rstrip(".") for name in text.split(",")]
    if any(n != "*" and not _HOST_NAME.fullmatch(n) for n in names):
        raise argparse.ArgumentTypeError(
            f"must be host names (letters, digits, '-', '_', '.') or '*', separated by commas, "
            f"got {text[:80]!r}"
        )
    return ",".join(names)


def shard_spec(text: str) -> Shard:
    """An argparse `type` for `--shard`: `K/N`, or `K-of-N` as a systemd instance name gives it."""
    try:
        return parse_shard(text)
    except ShardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def options_of(parser: argparse.ArgumentParser) -> list[Option]:
    """The parser's long options, in the order of `--help`."""
    found = []
    for action in parser._actions:
        names = [s[2:] for s in action.option_strings if s.startswith("--")]
        if names and action.dest not in _NOT_OPTIONS:
            found.append(Option(names[0], action))
    return found


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests given on the command line: parsed again with every default suppressed, which
    also resolves abbreviations (`--brok`) and `--flag=value` the way the real parse did."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(list(argv))))
    finally:
        for action, default in saved:
            action.default = default


def options_file_path(
    given: Path | None, explicit: bool, environ: Mapping[str, str]
) -> Path | None:
    """The options file to read: the flag, else the variable, else the default if it exists.
    An empty path turns the file off."""
    if not explicit:
        if OPTIONS_FILE_ENV not in environ:
            return DEFAULT_OPTIONS_FILE if DEFAULT_OPTIONS_FILE.is_file() else None
        given = Path(environ[OPTIONS_FILE_ENV])
    if given is None or str(given) in ("", "."):
        return None
    return given


def read_options_file(path: Path, known: Sequence[Option]) -> dict[str, Any]:
    """The file's keys and values; unknown keys are an error naming the nearest option."""
    where = f"options file {shown(str(path))}"
    values = _parse_toml(_options_text(path, where), where)
    names = [o.name for o in known]
    for key in values:
        if key not in names:
            raise OptionsError(f"{where}: unknown option {shown_text(key)}{_suggest(key, names)}")
    return values


def _options_text(path: Path, where: str) -> str:
    """The file's text, read only from a regular file of at most MAX_OPTIONS_FILE_BYTES: a
    FIFO would block the start (O_NONBLOCK opens one without waiting for a writer, fstat
    then refuses it), and /dev/zero would fill the memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OptionsError(
            f"{where}: not found (write one with `scheduler-publisher sample-options > "
            f"{shown(str(path))}`)"
        ) from None
    except OSError as exc:
        raise OptionsError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = _regular_file_bytes(fd, where)
    finally:
        os.close(fd)
    if len(data) > MAX_OPTIONS_FILE_BYTES:
        raise OptionsError(f"{where}: larger than {MAX_OPTIONS_FILE_BYTES} bytes (1 MiB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionsError(f"{where}: not valid TOML: not UTF-8 at byte {exc.start}") from None


def _regular_file_bytes(fd: int, where: str) -> bytes:
    """Up to one byte more than the limit, from an open file that must be a regular one."""
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        raise OptionsError(
            f"{where}: not a regular file (a {_FILE_KINDS.get(kind, 'special file')})"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= MAX_OPTIONS_FILE_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise OptionsError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    return b"".join(chunks)


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OptionsError(f"{where}: not valid TOML: {exc}{_set_twice(text, str(exc))}") from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise OptionsError(
            f"{where}: not valid TOML: an integer of more than "
            f"{sys.get_int_max_str_digits()} digits"
        ) from None
    except RecursionError:  # tomllib recurses once per level of arrays and inline tables
        raise OptionsError(f"{where}: not valid TOML: arrays or tables nested too deep") from None


def _set_twice(text: str, message: str) -> str:
    """The key tomllib's "Cannot overwrite a value" is about, which it does not name: the
    first top-level key set twice (an options file has no tables)."""
    if not message.startswith("Cannot overwrite a value"):
        return ""
    seen: set[str] = set()
    for found in _TOP_LEVEL_KEY.finditer(text.split("\n[", 1)[0]):
        key = found.group(1).strip("\"'")
        if key in seen:
            return f": {shown_text(key)} is set twice"
        seen.add(key)
    return ""


def _suggest(key: str, names: Sequence[str]) -> str:
    hyphenated = key.replace("_", "-").lower()
    close = [hyphenated] if hyphenated in names else difflib.get_close_matches(key, names, 1)
    return f"; did you mean {close[0]!r}?" if close else ""


def from_text(option: Option, text: str, where: str) -> Any:
    """A value given as text (an environment variable) for `option`."""
    if option.is_switch:
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise OptionsError(f"{where}: expected true/false, 1/0 or yes/no, got {text!r}")
        on = word in _TRUE
        return on if isinstance(option.action, argparse._StoreTrueAction) else not on
    return _convert(option, text, where)


def from_toml(option: Option, value: Any, where: str) -> Any:
    """A value read from the options file for `option`: its TOML type must fit, then its range."""
    kind = option.kind
    if option.name in ARRAY_OPTIONS and isinstance(value, list) and value:
        if not all(isinstance(item, str) for item in value):
            raise OptionsError(f"{where}: expected an array of strings, got {_render(value)}")
        value = ",".join(value)
    ok = {
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "string": isinstance(value, str),
    }[kind]
    # `mqtt-version = 5` reads naturally; a number that names one of the choices is accepted.
    named_choice = (
        kind == "string"
        and option.action.choices is not None
        and isinstance(value, int | float)
        and str(value) in option.action.choices
    )
    # `phase-slots = "auto"`: a word a number option also takes
    named_word = isinstance(value, str) and value in getattr(option.action.type, "words", ())
    if not ok and not named_choice and not named_word:
        raise OptionsError(
            f"{where}: expected {_article(kind)}, got {_toml_type(value)} {_render(value)}"
        )
    if option.is_switch:
        return value if isinstance(option.action, argparse._StoreTrueAction) else not value
    # A number goes to its Number type as the number TOML read, not as text: TOML's own forms
    # (1_000, 1e3, +5, inf) are not what the text of a flag may hold.
    numeric = isinstance(option.action.type, Number) and not isinstance(value, str)
    return _convert(option, value if numeric else str(value), where)


def _convert(option: Option, given: str | float, where: str) -> Any:
    kind = option.action.type
    try:
        value: Any = kind(given) if isinstance(kind, Number) else _as_text(option)(str(given))
    except argparse.ArgumentTypeError as exc:
        raise OptionsError(f"{where}: {exc}") from None
    except (TypeError, ValueError):
        raise OptionsError(
            f"{where}: expected {_article(option.kind)}, got {_shown(given)}"
        ) from None
    choices = option.action.choices
    if choices is not None and value not in choices:
        listed = ", ".join(repr(str(c)) for c in choices)
        raise OptionsError(f"{where}: expected one of {listed}, got {_shown(given)}")
    return value


def _as_text(option: Option) -> Callable[[str], Any]:
    kind = option.action.type
    return kind if callable(kind) else str


def _shown(given: str | float) -> str:
    return shown_text(given) if isinstance(given, str) else shown_number(given)


def _article(kind: str) -> str:
    return {
        "boolean": "true or false",
        "integer": "an integer",
        "number": "a number",
        "string": "a string",
    }[kind]


def _toml_type(value: Any) -> str:
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__  # dates and times


def _render(value: Any) -> str:
    text = repr(value) if not isinstance(value, bool) else str(value).lower()
    return text if len(text) <= 60 else text[:57] + "..."


def resolve(
    options: Sequence[Option],
    args: argparse.Namespace,
    explicit: set[str],
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    file_path: Path | None,
) -> dict[str, Origin]:
    """Fill `args` from the environment and the file where no flag was given; returns where each
    option's value came from."""
    origins: dict[str, Origin] = {}
    for option in options:
        if option.dest in explicit:
            origins[option.name] = Origin("flag", f"--{option.name}")
        elif option.env in environ:
            setattr(args, option.dest, from_text(option, environ[option.env], option.env))
            origins[option.name] = Origin("env", option.env)
        elif option.name in file_values:
            where = f"options file {file_path}: {option.name}"
            setattr(args, option.dest, from_toml(option, file_values[option.name], where))
            origins[option.name] = Origin("file", str(file_path))
        else:
            origins[option.name] = Origin("default")
    _drop_weaker_alternatives(options, args, origins)
    return origins


def _drop_weaker_alternatives(
    options: Sequence[Option], args: argparse.Namespace, origins: dict[str, Origin]
) -> None:
    dests = {o.name: o.dest for o in options}
    for group in ALTERNATIVES:
        given = [
            n
            for n in group
            if n in dests and getattr(args, dests[n]) is not None and origins[n].source != "default"
        ]
        if len(given) < 2:
            continue
        best = max(_RANK[origins[n].source] for n in given)
        for name in given:
            if _RANK[origins[name].source] < best:
                setattr(args, dests[name], None)
                origins[name] = Origin("default")


def environment_warnings(options: Sequence[Option], environ: Mapping[str, str]) -> Iterator[str]:
    """Variables that look meant for this service but are not read, with what to set instead."""
    known = {o.env for o in options} | {OPTIONS_FILE_ENV}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), 1)
            hint = f"; did you mean {close[0]}?" if close else ""
            yield f"{name} is not an option and is ignored{hint}"
    by_name = {o.name: o for o in options}
    for name, option in FOREIGN_ENV.items():
        if name in environ and option in by_name:
            yield (
                f"{name} is not read by scheduler-publisher; set {by_name[option].env} "
                f"(or --{option}) instead"
            )
