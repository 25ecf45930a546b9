"""Options from flags, SCHEDULER_PUBLISHER_* variables and the TOML options file; range checks.

Most tests run the CLI in-process and read `show-options`, which prints each option's effective
value and its source. `run` is replaced by a stub that fails the test if it is ever reached, so
a range check that lets a bad value through shows as a failure, not as a started service.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler_publisher.cli import arguments, options
from scheduler_publisher.cli import main as cli
from scheduler_publisher.cli.main import main
from tests.support import (
    REPO,
    Mosquitto,
    ServiceProcess,
    SubscriberFactory,
    entry,
    write_config,
)

SHOWN = re.compile(r"^(?P<name>[a-z-]+) = (?P<value>.+?)  # (?P<source>.+)$")
UNSET = re.compile(r"^# (?P<name>[a-z-]+) is not set  # (?P<source>.+)$")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No option variable from the caller's shell, and no /etc options file, leaks in."""
    for name in list(os.environ):
        if name.startswith("SCHEDULER_PUBLISHER_") or name in (
            "MQTT_PASSWORD",
            "CREDENTIALS_DIRECTORY",
            *options.FOREIGN_ENV,
        ):
            monkeypatch.delenv(name)
    monkeypatch.setattr(options, "DEFAULT_OPTIONS_FILE", tmp_path / "absent" / "default.toml")


@pytest.fixture(autouse=True)
def never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` must not start here: every run in this module is expected to exit 2 first."""

    def refuse(_args: argparse.Namespace) -> int:
        raise AssertionError("the service was started; the options should have been refused")

    monkeypatch.setitem(cli.COMMAND_HANDLERS, "run", refuse)


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    return code if isinstance(code, int) else 0


def show(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, tuple[str | None, str]]:
    """`show-options` as {option: (value text or None when unset, source)}."""
    assert run_main(["show-options", *argv]) == 0, capsys.readouterr().err
    found: dict[str, tuple[str | None, str]] = {}
    for line in capsys.readouterr().out.splitlines():
        if m := SHOWN.match(line):
            found[m["name"]] = (m["value"], m["source"])
        elif m := UNSET.match(line):
            found[m["name"]] = (None, m["source"])
    return found


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Runs argv, expects exit 2 and exactly one line on stderr; returns that line."""
    assert run_main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def run_options() -> list[options.Option]:
    return options.options_of(arguments.subparser(arguments.build_parser(), "run"))


def write_options(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- precedence -----------------------------------------------------------------------------


def test_precedence_is_flag_then_environment_then_file_then_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One option given at every level: each level beats the ones below it."""
    opts = write_options(tmp_path / "o.toml", "port = 1886\n")
    monkeypatch.setenv("SCHEDULER_PUBLISHER_PORT", "1885")

    assert show(capsys, "--options-file", str(opts), "--port", "1884")["port"] == (
        "1884",
        "flag --port",
    )
    assert show(capsys, "--options-file", str(opts))["port"] == (
        "1885",
        "env SCHEDULER_PUBLISHER_PORT",
    )
    monkeypatch.delenv("SCHEDULER_PUBLISHER_PORT")
    assert show(capsys, "--options-file", str(opts))["port"] == ("1886", f"file {opts}")
    assert show(capsys, "--options-file", "")["port"] == ("1883", "default (derived)")


def test_abbreviated_and_equals_flags_count_as_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--brok=h` is a flag like `--broker h`: the environment does not override it."""
    monkeypatch.setenv("SCHEDULER_PUBLISHER_BROKER", "from-env")
    assert show(capsys, "--brok=from-flag")["broker"] == (
        '"mqtt://from-flag:1883"',
        "flag --broker",
    )


def test_every_run_option_can_come_from_the_environment_or_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each option of `run`, set through its variable and then through its key, is taken."""
    samples = {
        "boolean": (True, "true"),
        "integer": (7, "7"),
        "number": (7.5, "7.5"),
        "string": ("x7", "x7"),
    }
    formatted = {"shard": ("1/2", "1/2")}  # strings with a form of their own
    every = run_options()
    for option in every:
        if option.action.choices is not None:
            choice = str(list(option.action.choices)[-1])
            monkeypatch.setenv(option.env, choice)
        else:
            monkeypatch.setenv(option.env, formatted.get(option.name, samples[option.kind])[1])
    by_env = show(capsys, "--options-file", "")
    assert {n: s for n, (_, s) in by_env.items()} == {
        o.name: f"env {o.env}{sharded(o.name)}" for o in every
    }

    for option in every:
        monkeypatch.delenv(option.env)
    lines = []
    for option in every:
        value: Any = (
            str(list(option.action.choices)[-1])
            if option.action.choices is not None
            else formatted.get(option.name, samples[option.kind])[0]
        )
        lines.append(f"{option.name} = {cli._toml_value(value)}")
    opts = write_options(tmp_path / "all.toml", "\n".join(lines) + "\n")
    by_file = show(capsys, "--options-file", str(opts))
    assert {n: s for n, (_, s) in by_file.items()} == {
        o.name: f"file {opts}{sharded(o.name, paths=True)}" for o in every
    }


def sharded(name: str, *, paths: bool = False) -> str:
    """What show-options adds to the source of a value the shard's suffix is added to: the
    names always, the file paths when they come from the (shared) options file."""
    derived = ("client-id", "status-topic", *(("state-db", "log-file") if paths else ()))
    return " (derived: --shard)" if name in derived else ""


def test_a_flag_added_to_run_is_an_env_var_and_a_file_key_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The mechanism lists no options: a new `run` flag works from env and file unchanged."""
    original = arguments.add_run_arguments

    def with_extra(p: argparse.ArgumentParser) -> None:
        original(p)
        p.add_argument("--frobnicate-limit", type=options.Number(int, 1, 9), default=3)

    monkeypatch.setattr(arguments, "add_run_arguments", with_extra)
    monkeypatch.setenv("SCHEDULER_PUBLISHER_FROBNICATE_LIMIT", "4")
    assert show(capsys)["frobnicate-limit"] == ("4", "env SCHEDULER_PUBLISHER_FROBNICATE_LIMIT")
    monkeypatch.delenv("SCHEDULER_PUBLISHER_FROBNICATE_LIMIT")
    opts = write_options(tmp_path / "o.toml", "frobnicate-limit = 5\n")
    assert show(capsys, "--options-file", str(opts))["frobnicate-limit"] == ("5", f"file {opts}")
    bad = write_options(tmp_path / "bad.toml", "frobnicate-limit = 10\n")
    line = usage_error(capsys, ["run", "--options-file", str(bad)])
    assert "frobnicate-limit: must be an integer from 1 to 9, got 10" in line


# ---- the options file -----------------------------------------------------------------------


def test_default_options_file_is_read_when_it_exists_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default path is read if present; `--options-file ''` ignores it."""
    default = write_options(tmp_path / "default.toml", 'broker = "from-default-file"\n')
    monkeypatch.setattr(options, "DEFAULT_OPTIONS_FILE", default)

    assert show(capsys)["broker"] == ('"mqtt://from-default-file:1883"', f"file {default}")
    assert show(capsys, "--options-file", "")["broker"] == ('"mqtt://localhost:1883"', "default")


def test_options_file_named_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SCHEDULER_PUBLISHER_OPTIONS_FILE names the file when no flag does."""
    opts = write_options(tmp_path / "env.toml", "keepalive = 45\n")
    monkeypatch.setenv("SCHEDULER_PUBLISHER_OPTIONS_FILE", str(opts))
    assert show(capsys)["keepalive"] == ("45", f"file {opts}")


def test_a_missing_named_options_file_exits_2_and_says_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A named file that does not exist is a usage error, with the sample-options command."""
    line = usage_error(capsys, ["run", "--options-file", str(tmp_path / "nope.toml")])
    assert f"options file {tmp_path / 'nope.toml'}: not found" in line
    assert "scheduler-publisher sample-options >" in line


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("http_port", "http-port"),
        ("brokr", "broker"),
        ("HTTP-PORT", "http-port"),
        ("stats-intervall", "stats-interval"),
    ],
)
def test_unknown_key_exits_2_with_did_you_mean(
    key: str, suggestion: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown key names itself and the nearest option."""
    opts = write_options(tmp_path / "o.toml", f"{key} = 1\n")
    line = usage_error(capsys, ["run", "--options-file", str(opts)])
    assert f"unknown option {key!r}; did you mean {suggestion!r}?" in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('port = "1883"', "port: expected an integer, got string '1883'"),
        ('tls = "yes"', "tls: expected true or false, got string 'yes'"),
        ("broker = 5", "broker: expected a string, got integer 5"),
        ("backoff-max = true", "backoff-max: expected a number, got boolean true"),
        ("username = [1, 2]", "username: expected a string, got array [1, 2]"),
        ("stats-interval = 0", "stats-interval: must be a number from 0.1 to 86400, got 0"),
    ],
)
def test_file_type_errors_name_key_received_and_expected(
    text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value of the wrong TOML type or range: the key, what came, what was expected."""
    opts = write_options(tmp_path / "o.toml", text + "\n")
    line = usage_error(capsys, ["run", "--options-file", str(opts)])
    assert f"options file {opts}: {expected}" in line


def test_a_number_naming_a_choice_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mqtt-version = 5` reads as the choice "5"; `log-level = "debug"` as DEBUG."""
    opts = write_options(tmp_path / "o.toml", 'mqtt-version = 5\nlog-level = "debug"\n')
    shown = show(capsys, "--options-file", str(opts))
    assert shown["mqtt-version"][0] == '"5"'
    assert shown["log-level"][0] == '"DEBUG"'


@pytest.mark.parametrize(
    ("source", "text", "toml", "shown"),
    [
        ("flag", "auto", "", '"auto"'),
        ("env", "auto", "", '"auto"'),
        ("file", "", '"auto"', '"auto"'),
        ("flag", "10", "", "10"),
        ("file", "", "10", "10"),
    ],
)
def test_phase_slots_take_auto_or_a_count_from_every_source(
    source: str,
    text: str,
    toml: str,
    shown: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--phase-slots` is a count from 1 to 100 or the word auto: from a flag, a variable, or
    the options file as a TOML string or integer; auto reaches the settings as None."""
    argv: list[str] = []
    if source == "flag":
        argv = ["--phase-slots", text]
    elif source == "env":
        monkeypatch.setenv("SCHEDULER_PUBLISHER_PHASE_SLOTS", text)
    else:
        argv = [
            "--options-file",
            str(write_options(tmp_path / "o.toml", f"phase-slots = {toml}\n")),
        ]
    value, where = show(capsys, *argv)["phase-slots"]
    assert (value, where.split()[0]) == (shown, source)
    settings = cli.build_settings(
        arguments.build_parser().parse_args(["run", "--phase-slots", shown.strip('"')]), {}
    )
    assert settings.phase_slots == (None if shown == '"auto"' else int(shown))


def test_invalid_toml_exits_2_naming_the_file_and_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text that is not TOML: the file and the place tomllib found."""
    opts = write_options(tmp_path / "o.toml", 'broker = "a"\nport = \n')
    line = usage_error(capsys, ["run", "--options-file", str(opts)])
    assert f"options file {opts}: not valid TOML" in line
    assert "line 2" in line


# ---- hostile options files (issue 27, #10) --------------------------------------------------

HOSTILE_OPTIONS: list[tuple[str, str | bytes, str]] = [
    ("5000 digits", "port = " + "1" * 5000 + "\n", "not valid TOML: an integer of more than 4300"),
    ("deep arrays", "port = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deep"),
    ("deep tables", "port = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "nested too deep"),
    ("over 1 MiB", "#" + "x" * (1 << 20) + "\n", "larger than 1048576 bytes (1 MiB)"),
    ("not UTF-8", b"port = 1 # \xff\n", "not valid TOML: not UTF-8 at byte 11"),
    ("set twice", 'broker = "a"\nport = 1\n"port" = 2\n', "'port' is set twice"),
    ("long key", "k" * 100_000 + " = 1\n", "unknown option 'kkkkkkkk"),
]
# Values of keys that `validate` does not read (it reads `config` and `shard` only)
HOSTILE_VALUES = [
    ("4000 digits", "port = " + "9" * 4000 + "\n", "got an integer of 4000 digits"),
    ("float overflow", "backoff-min = " + "9" * 400 + "\n", "got an integer of 400 digits"),
]


@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        *(
            (command, text, message)
            for command in ("run", "show-options", "validate")
            for _, text, message in HOSTILE_OPTIONS
        ),
        *(
            (command, text, message)
            for command in ("run", "show-options")
            for _, text, message in HOSTILE_VALUES
        ),
    ],
    ids=[
        *(
            f"{c}-{name}"
            for c in ("run", "show-options", "validate")
            for name, _, _ in HOSTILE_OPTIONS
        ),
        *(f"{c}-{name}" for c in ("run", "show-options") for name, _, _ in HOSTILE_VALUES),
    ],
)
def test_hostile_options_files_exit_2_in_one_short_line_naming_the_file(
    command: str,
    text: str | bytes,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Huge numbers, deep nesting, a huge file, bytes that are not UTF-8, a key set twice:
    exit 2 with one line that names the file and what is wrong, never a traceback."""
    opts = tmp_path / "o.toml"
    if isinstance(text, bytes):
        opts.write_bytes(text)
    else:
        write_options(opts, text)
    line = usage_error(capsys, [command, "--options-file", str(opts)])
    assert line.startswith(f"scheduler-publisher {command}: error: options file {opts}: "), line
    assert message in line, line
    assert len(line) < 300


def test_an_options_file_of_1_mib_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The limit is 1 MiB exactly: a file of that size (comments and one key) is read."""
    body = "keepalive = 45\n"
    opts = write_options(tmp_path / "o.toml", "#" * ((1 << 20) - len(body) - 1) + "\n" + body)
    assert opts.stat().st_size == 1 << 20
    assert show(capsys, "--options-file", str(opts))["keepalive"] == ("45", f"file {opts}")


def test_a_directory_as_options_file_exits_2_naming_its_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory is not read as an options file."""
    line = usage_error(capsys, ["show-options", "--options-file", str(tmp_path)])
    assert line.endswith(f"options file {tmp_path}: not a regular file (a directory)")


def _limited_memory() -> None:  # in the child: /dev/zero must not take the machine's memory
    import resource  # noqa: PLC0415 - only in the child process

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize("kind", ["FIFO", "character device"])
@pytest.mark.parametrize("command", ["run", "show-options"])
def test_a_fifo_or_a_device_as_options_file_exits_2_at_once(
    command: str, kind: str, tmp_path: Path
) -> None:
    """A FIFO (reading it would wait for a writer forever) and /dev/zero (endless) are refused
    at once, by the real process: exit 2 and one line naming the file and its kind."""
    if kind == "FIFO":
        path = tmp_path / "options.fifo"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_PUBLISHER_")}
    refusal = f"not a regular file (a {kind})"
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_publisher", command, "--options-file", str(path)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=_limited_memory,
    )
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2,
        [f"scheduler-publisher {command}: error: options file {path}: {refusal}"],
    )


def test_validate_takes_its_config_path_from_the_options_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate` reads `config` from the file and ignores the keys only `run` uses."""
    sample = REPO / "JSON" / "payloadStaticConfig.json"
    opts = write_options(tmp_path / "o.toml", f'config = "{sample}"\nbroker = "mqtt.example"\n')
    assert run_main(["validate", "--options-file", str(opts)]) == 0
    assert f"{sample}: valid: 4 valid entries" in capsys.readouterr().out


# ---- the environment ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", "true"),
        ("1", "true"),
        ("yes", "true"),
        ("YES", "true"),
        ("on", "true"),
        ("false", "false"),
        ("0", "false"),
        ("no", "false"),
        ("off", "false"),
    ],
)
def test_environment_switches_accept_true_false_1_0_yes_no(
    text: str, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SCHEDULER_PUBLISHER_TLS=yes turns --tls on; =0 leaves it off."""
    monkeypatch.setenv("SCHEDULER_PUBLISHER_TLS", text)
    assert show(capsys)["tls"] == (expected, "env SCHEDULER_PUBLISHER_TLS")


def test_environment_switch_with_another_word_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SCHEDULER_PUBLISHER_NO_WATCH=maybe: exit 2 naming the variable and the accepted words."""
    monkeypatch.setenv("SCHEDULER_PUBLISHER_NO_WATCH", "maybe")
    line = usage_error(capsys, ["run"])
    assert "SCHEDULER_PUBLISHER_NO_WATCH: expected true/false, 1/0 or yes/no, got 'maybe'" in line


def test_unknown_variable_warns_with_did_you_mean_and_does_not_stop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SCHEDULER_PUBLISHER_BROKR is reported with the right name; the command still runs."""
    monkeypatch.setenv("SCHEDULER_PUBLISHER_BROKR", "mqtt.example")
    assert run_main(["show-options"]) == 0
    err = capsys.readouterr().err
    assert (
        "SCHEDULER_PUBLISHER_BROKR is not an option and is ignored; did you mean "
        "SCHEDULER_PUBLISHER_BROKER?"
    ) in err


@pytest.mark.parametrize(
    ("name", "right"),
    [
        ("MQTT_BROKER", "SCHEDULER_PUBLISHER_BROKER"),
        ("MQTT_HOST", "SCHEDULER_PUBLISHER_BROKER"),
        ("MQTT_PORT", "SCHEDULER_PUBLISHER_PORT"),
        ("MQTT_USERNAME", "SCHEDULER_PUBLISHER_USERNAME"),
    ],
)
def test_other_tools_mqtt_variables_warn_and_name_the_right_one(
    name: str, right: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """MQTT_HOST and friends are not read: a warning says which variable to set instead."""
    monkeypatch.setenv(name, "1884")
    shown = show(capsys)
    assert shown["broker"] == ('"mqtt://localhost:1883"', "default")
    run_main(["show-options"])
    assert f"{name} is not read by scheduler-publisher; set {right}" in capsys.readouterr().err


# ---- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["flag", "env", "file", "MQTT_PASSWORD"])
def test_show_options_redacts_the_password_and_names_its_source(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The password shows as <redacted> with where it came from, from any source."""
    secret = f"pw-{uuid.uuid4().hex}"
    argv = ["show-options"]
    expected = {
        "flag": "flag --password",
        "env": "env SCHEDULER_PUBLISHER_PASSWORD",
        "file": f"file {tmp_path / 'o.toml'}",
        "MQTT_PASSWORD": "env MQTT_PASSWORD",
    }
    if source == "flag":
        argv += ["--password", secret]
    elif source == "env":
        monkeypatch.setenv("SCHEDULER_PUBLISHER_PASSWORD", secret)
    elif source == "file":
        argv += [
            "--options-file",
            str(write_options(tmp_path / "o.toml", f'password = "{secret}"\n')),
        ]
    else:
        monkeypatch.setenv("MQTT_PASSWORD", secret)

    assert run_main(argv) == 0
    out = capsys.readouterr().out
    assert secret not in out
    assert f'password = "<redacted>"  # {expected[source]}' in out.splitlines()


def test_a_password_file_flag_beats_a_password_in_the_options_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two ways to give one secret: the stronger source wins, the weaker is dropped."""
    (tmp_path / "pw").write_text("from-the-flag-file\n")
    opts = write_options(tmp_path / "o.toml", 'password = "from-options-file"\n')
    argv = ["run", "--password-file", str(tmp_path / "pw"), "--options-file", str(opts)]
    args = arguments.build_parser().parse_args(argv)
    arguments.apply_options(arguments.build_parser(), argv, args, {})
    assert cli.read_password(args, {}) == "from-the-flag-file"


def effective_password(argv: list[str], environ: dict[str, str]) -> str | None:
    """The password `run` with these flags and this environment would connect with."""
    parser = arguments.build_parser()
    args = parser.parse_args(argv)
    args.origins = arguments.apply_options(parser, argv, args, environ)
    return cli.read_password(args, environ)


def secret_file(path: Path, secret: str) -> str:
    path.write_text(f"{secret}\n")
    return str(path)


ENVIRONMENT_SECRETS = ["MQTT_PASSWORD", "credential", "PASSWORD", "PASSWORD_FILE"]


def environment_secret(kind: str, tmp_path: Path) -> dict[str, str]:
    """An environment that gives the password "from-env" in one of its four ways."""
    if kind == "MQTT_PASSWORD":
        return {"MQTT_PASSWORD": "from-env"}
    if kind == "credential":
        (tmp_path / "creds").mkdir()
        secret_file(tmp_path / "creds" / "mqtt-password", "from-env")
        return {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    if kind == "PASSWORD":
        return {"SCHEDULER_PUBLISHER_PASSWORD": "from-env"}
    return {"SCHEDULER_PUBLISHER_PASSWORD_FILE": secret_file(tmp_path / "env-pw", "from-env")}


@pytest.mark.parametrize("env_kind", ENVIRONMENT_SECRETS)
@pytest.mark.parametrize("file_key", ["password", "password-file"])
def test_a_password_from_the_environment_beats_one_in_the_options_file(
    env_kind: str, file_key: str, tmp_path: Path
) -> None:
    """A stale password in the options file (as a key or a file it names) loses to the
    environment and the systemd credential, as every option's file value does; a flag beats
    them all."""
    stale = secret_file(tmp_path / "stale-pw", "stale")
    value = stale if file_key == "password-file" else "stale"
    opts = write_options(tmp_path / "o.toml", f'{file_key} = "{value}"\n')
    environ = environment_secret(env_kind, tmp_path)
    argv = ["run", "--options-file", str(opts)]

    assert effective_password(argv, {}) == "stale"
    assert effective_password(argv, environ) == "from-env"
    assert effective_password([*argv, "--password", "from-flag"], environ) == "from-flag"
    flag_file = secret_file(tmp_path / "flag-pw", "from-flag-file")
    assert effective_password([*argv, "--password-file", flag_file], environ) == "from-flag-file"


def test_show_options_names_the_password_that_wins_and_each_it_beats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """show-options says which place the password is read from, and which others are not used."""
    opts = write_options(tmp_path / "o.toml", 'password = "stale"\n')
    (tmp_path / "creds").mkdir()
    secret_file(tmp_path / "creds" / "mqtt-password", "from-credential")
    monkeypatch.setenv("MQTT_PASSWORD", "from-env")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))

    assert run_main(["show-options", "--options-file", str(opts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'password = "<redacted>"  # env MQTT_PASSWORD' in lines
    beaten = [line for line in lines if line.startswith("# password from ")]
    assert beaten == [
        "# password from systemd credential mqtt-password is not used: "
        "env MQTT_PASSWORD comes first",
        f"# password from file {opts} is not used: env MQTT_PASSWORD comes first",
    ]
    assert not any("from-env" in line or "stale" in line for line in lines)


# ---- derived names (issue 28, 3.4) ---------------------------------------------------------


@pytest.mark.parametrize("shard", [[], ["--shard", "2/3"]])
@pytest.mark.parametrize("client_id", [[], ["--client-id", "gw-7"]])
@pytest.mark.parametrize("status_topic", [[], ["--status-topic", "site/status"]])
@pytest.mark.parametrize("config", [[], ["--config", "elsewhere/entries.json"]])
def test_show_options_prints_the_client_id_and_status_topic_the_service_uses(
    shard: list[str],
    client_id: list[str],
    status_topic: list[str],
    config: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Given or derived (from the host and the config file's path), with a shard's suffix or
    not: show-options prints the names `run` connects with, and says which were derived."""
    flags = [*shard, *client_id, *status_topic, *config]
    shown = show(capsys, *flags)
    parser = arguments.build_parser()
    args = parser.parse_args(["run", *flags])
    args.origins = arguments.apply_options(parser, ["run", *flags], args, {})
    broker = cli.build_settings(args, {}).broker

    assert shown["client-id"][0] == f'"{broker.client_id}"'
    assert shown["status-topic"][0] == f'"{broker.effective_status_topic}"'
    for name, given in (("client-id", client_id), ("status-topic", status_topic)):
        source = shown[name][1]
        if not given:
            assert source == "default (derived)"
        else:
            assert source == f"flag --{name}" + (" (derived: --shard)" if shard else "")


# ---- range checks (issue 11, #15) -----------------------------------------------------------

BAD_VALUES = [
    ("connect-rate", "0", "must be a number from 0.1 to 100000, got 0"),
    ("connect-rate", "-5", "must be a number from 0.1 to 100000, got -5"),
    # nan and inf: a TOML float out of range, and text that is not a number elsewhere
    ("connect-rate", "nan", "must be a number from 0.1 to 100000, got "),
    ("stats-interval", "0", "must be a number from 0.1 to 86400, got 0"),
    ("checkpoint-interval", "0", "must be a number from 0.1 to 86400, got 0"),
    ("history-interval", "0", "must be a number from 0.1 to 86400, got 0"),
    ("history-retention", "0", "must be an integer from 1 to 1000000000, got 0"),
    ("phase-slots", "0", "must be an integer from 1 to 100 or 'auto', got 0"),
    ("phase-slots", "101", "must be an integer from 1 to 100 or 'auto', got 101"),
    ("keepalive", "-5", "must be an integer from 1 to 65535, got -5"),
    ("keepalive", "70000", "must be an integer from 1 to 65535, got 70000"),
    ("status-topic", "", 'topic must be a non-empty string, got ""'),
    ("status-topic", "a/+/b", 'topic must be free of the wildcards "+" and "#", got "a/+/b"'),
    ("status-topic", "a/#", 'topic must be free of the wildcards "+" and "#", got'),
    ("status-topic", "$SYS/x", "topic must be outside the broker-owned $SYS"),
    ("status-topic", "$aws/x", 'topic must not start with "$"'),
    ("status-topic", "a\x07b", "U+0007 (a control character) at character 2"),
    ("status-topic", "a\uffffb", "U+FFFF (a noncharacter) at character 2"),
    ("status-topic", "/".join("x" * 201), "topic must have at most 200 levels, got 201"),
    ("max-config-bytes", "0", "must be an integer from 2 to 1073741824, got 0"),
    ("http-port", "70000", "must be an integer from 0 to 65535, got 70000"),
    ("http-port", "-1", "must be an integer from 0 to 65535, got -1"),
    ("port", "0", "must be an integer from 1 to 65535, got 0"),
    ("port", "70000", "must be an integer from 1 to 65535, got 70000"),
    ("will-delay", "-1", "must be an integer from 0 to 4294967295, got -1"),
    ("max-retries", "0", "must be an integer at least 1, got 0"),
    ("backoff-min", "0", "must be a number from 0.01 to 3600, got 0"),
    ("backoff-max", "inf", "must be a number from 0.01 to 86400, got "),
    ("client-id", "", "must be non-empty valid UTF-8 without control characters"),
    ("username", "gw\n01", "must be non-empty valid UTF-8 without control characters"),
    ("broker", "mqtt example", "or wss:// URL, without spaces, got 'mqtt example'"),
    ("http-host", "", "must be a host name or IP address without spaces"),
]


@pytest.mark.parametrize(
    ("name", "value", "message"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES]
)
@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_out_of_range_values_exit_2_in_one_line_from_every_source(
    name: str,
    value: str,
    message: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A nonsense value exits 2 with one line naming the option, the range and the value."""
    argv = ["run"]
    option = next(o for o in run_options() if o.name == name)
    if source == "flag":
        argv.append(f"--{name}={value}")
        where = f"argument --{name}: "
    elif source == "env":
        monkeypatch.setenv(option.env, value)
        where = f"{option.env}: "
    else:
        numeric = option.kind in ("integer", "number") and value not in ("", "0x")
        toml_value = value if numeric else cli._toml_value(value)  # nan and inf are TOML too
        opts = write_options(tmp_path / "o.toml", f"{name} = {toml_value}\n")
        argv += ["--options-file", str(opts)]
        where = f"options file {opts}: {name}: "
    line = usage_error(capsys, argv)
    assert line.startswith("scheduler-publisher run: error: "), line
    assert where in line, line
    assert message in line, line


# ---- numbers as text: ASCII digits only (issue 27, #13) --------------------------------------

NOT_PLAIN_INTEGERS = [
    *("1_883", " 1883", "1883 ", "1883\n", "+1883", "0x75b", "1e3", "1883.0", ""),
    "\u0661\u0668\u0668\u0663",  # Arabic-Indic digits: int() reads them as 1883
    "\uff11\uff18\uff18\uff13",  # full-width digits
    "\u0967\u096e\u096e\u0969",  # Devanagari digits
]
NOT_PLAIN_FLOATS = [
    *("1_0.5", " 2", "2.5 ", "+2", "inf", "-inf", "nan", "2,5", "0x1p3", "1e", "."),
    "\u0662.\u0665",  # Arabic-Indic digits: float() reads them as 2.5
]


def _numeric_options() -> list[options.Option]:
    return [o for o in run_options() if isinstance(o.action.type, options.Number)]


def _given(
    monkeypatch: pytest.MonkeyPatch, option: options.Option, source: str, text: str
) -> list[str]:
    """The argv of `show-options` with `text` for `option` from a flag or the environment."""
    if source == "flag":
        return [f"--{option.name}={text}"]
    monkeypatch.setenv(option.env, text)
    return []


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        *(("port", t, "an integer from 1 to 65535") for t in NOT_PLAIN_INTEGERS),
        *(("backoff-min", t, "a number from 0.01 to 3600") for t in NOT_PLAIN_FLOATS),
    ],
)
@pytest.mark.parametrize("source", ["flag", "env"])
def test_numbers_from_flags_and_variables_are_plain_ascii(
    source: str,
    name: str,
    text: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Blanks, "_", "+", hex, other scripts' digits, inf and nan: Python's int() and float()
    read them, the options file takes no number as a string, so a flag or a variable takes
    none either: exit 2 naming what was received."""
    option = next(o for o in run_options() if o.name == name)
    argv = ["show-options", *_given(monkeypatch, option, source, text)]
    line = usage_error(capsys, argv)
    assert f"must be {expected}, got {text!r}" in line, line


@pytest.mark.parametrize("source", ["flag", "env"])
def test_every_numeric_option_takes_ascii_digits_only(
    source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rule holds for every integer and number option, not only --port."""
    for option in _numeric_options():
        for text in ("1_0", "\u0661\u0660", " 10"):
            with monkeypatch.context() as scoped:
                line = usage_error(capsys, ["show-options", *_given(scoped, option, source, text)])
            assert f"got {text!r}" in line, (option.name, line)


@pytest.mark.parametrize("source", ["flag", "env"])
def test_a_number_of_5000_digits_is_refused_in_a_short_line(
    source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Digits beyond int()'s limit say how many there were, not Python's limit."""
    option = next(o for o in run_options() if o.name == "port")
    line = usage_error(capsys, ["show-options", *_given(monkeypatch, option, source, "1" * 5000)])
    assert "must be an integer from 1 to 65535, got a number of 5000 characters" in line
    assert len(line) < 200


def test_flags_variables_and_the_file_agree_on_every_number(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """For every integer and number option, the same value from a flag, a variable and the
    options file is the same effective value."""
    for option in _numeric_options():
        number = option.action.type
        assert isinstance(number, options.Number)
        value = number.low + 1  # in every range, and clear of backoff-min <= backoff-max
        text = str(int(value)) if number.kind is int else repr(float(value))
        seen = set()
        for source in ("flag", "env", "file"):
            with monkeypatch.context() as scoped:
                if source == "file":
                    opts = write_options(tmp_path / "o.toml", f"{option.name} = {text}\n")
                    argv = ["--options-file", str(opts)]
                else:
                    argv = _given(scoped, option, source, text)
                seen.add(show(capsys, *argv)[option.name][0])
        assert seen == {text}, (option.name, seen)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--backoff-min", "5", "--backoff-max", "1"],
            "backoff-min (5, flag --backoff-min) must not be larger than backoff-max (1, flag "
            "--backoff-max)",
        ),
        (
            ["--backoff-min", "90"],
            "backoff-min (90, flag --backoff-min) must not be larger than "
            "backoff-max (60, default)",
        ),
        (["--keyfile", "k.pem"], "keyfile (flag --keyfile) needs certfile"),
        (["--mqtt-version", "4"], "argument --mqtt-version: invalid choice: '4'"),
        (["--log-level", "verbose"], "argument --log-level: invalid choice: 'VERBOSE'"),
    ],
)
def test_contradicting_or_unknown_values_exit_2_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Options that contradict each other, or a value outside the choices, exit 2."""
    assert message in usage_error(capsys, ["run", *argv])


def test_the_real_process_refuses_connect_rate_0_without_creating_logs(tmp_path: Path) -> None:
    """`scheduler-publisher --connect-rate 0` exits 2 with one line and leaves no ./logs/."""
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_publisher", "--connect-rate", "0", "--options-file", ""],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "scheduler-publisher run: error: argument --connect-rate: must be a number from 0.1 to "
        "100000, got 0 (see `scheduler-publisher run --help`)"
    ]
    assert not (tmp_path / "logs").exists()


# ---- a client id and what is derived from it (issue 27, #11) --------------------------------

STATUS_WRAP = "scheduler-publisher/<client-id>/status"


def sized(size: int, unit: str = "c") -> str:
    """A client id of `size` UTF-8 bytes made of `unit`."""
    text = unit * (size // len(unit.encode()))
    assert len(text.encode()) == size
    return text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--client-id", sized(65509)],
            f"client-id (flag --client-id): must be at most 65508 UTF-8 bytes (with the status "
            f"topic {STATUS_WRAP}, within MQTT's 65535), got 65509",
        ),
        (
            ["--client-id", sized(65510, "\u00e9")],  # 32,755 characters, 65,510 bytes
            "must be at most 65508 UTF-8 bytes",
        ),
        (
            ["--client-id", sized(65502), "--shard", "1/2"],
            "client-id (flag --client-id): must be at most 65501 UTF-8 bytes (with the shard's "
            f"suffix -1-of-2 and the status topic {STATUS_WRAP}, within MQTT's 65535), got 65502",
        ),
        (
            ["--client-id", sized(65523), "--shard", "1000/1024", "--status-topic", "s"],
            "client-id (flag --client-id): must be at most 65522 UTF-8 bytes (with the shard's "
            "suffix -1000-of-1024, within MQTT's 65535), got 65523",
        ),
        (
            ["--client-id", "gw+1"],
            f"client-id (flag --client-id): would make the status topic {STATUS_WRAP} invalid "
            '(topic must be free of the wildcards "+" and "#", got '
            '"scheduler-publisher/gw+1/status"); give --status-topic, or another client id',
        ),
        (["--client-id", "gw#"], 'must be free of the wildcards "+" and "#"'),
        (["--client-id", "/" * 198], "topic must have at most 200 levels, got 201"),
        (
            ["--status-topic", "/".join("s" * 200), "--shard", "2/3"],
            "status-topic (flag --status-topic): with the shard's level /2-of-3 added, topic "
            "must have at most 200 levels, got 201",
        ),
        (
            ["--status-topic", "s" * 65530, "--shard", "2/3"],
            "status-topic (flag --status-topic): with the shard's level /2-of-3 added, topic "
            "must be at most 65535 UTF-8 bytes, got 65537 bytes",
        ),
    ],
    ids=[
        *("65509", "multibyte", "shard", "shard-explicit-topic", "plus", "hash", "levels"),
        *("topic-levels", "topic-bytes"),
    ],
)
@pytest.mark.parametrize("command", ["run", "show-options"])
def test_a_client_id_too_long_for_what_is_derived_from_it_exits_2(
    command: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The status topic wraps the client id and a shard adds its suffix: a client id (or a
    status topic) that fits alone but not with those exits 2 at start, naming the option,
    the length received and the limit, instead of failing at every connect."""
    line = usage_error(capsys, [command, "--options-file", "", *argv])
    assert message in line, line[:400]
    assert len(line) < 400


@pytest.mark.parametrize("source", ["env", "file"])
def test_the_client_id_limit_holds_from_every_source(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """From SCHEDULER_PUBLISHER_CLIENT_ID or the options file, the same limit and message."""
    argv = ["run"]
    if source == "env":
        monkeypatch.setenv("SCHEDULER_PUBLISHER_CLIENT_ID", sized(65509))
        where = "env SCHEDULER_PUBLISHER_CLIENT_ID"
    else:
        opts = write_options(tmp_path / "o.toml", f'client-id = "{sized(65509)}"\n')
        argv += ["--options-file", str(opts)]
        where = f"file {opts}"
    line = usage_error(capsys, argv)
    assert f"client-id ({where}): must be at most 65508 UTF-8 bytes" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["--client-id", sized(65508)],
        ["--client-id", sized(65501), "--shard", "1/2"],
        ["--client-id", sized(65522), "--shard", "1000/1024", "--status-topic", "s"],
        ["--client-id", "gw/01"],
        ["--status-topic", "s" * 65528, "--shard", "2/3"],
    ],
    ids=["65508", "shard", "shard-explicit-topic", "slash", "topic"],
)
def test_a_client_id_at_the_limit_is_accepted(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The limits are exact: one byte less than the refused lengths is accepted."""
    shown = show(capsys, "--options-file", "", *argv)
    assert shown["client-id"][1] in (
        "flag --client-id",
        "flag --client-id (derived: --shard)",
        "default (derived)",
    )


# ---- sample-options -------------------------------------------------------------------------


def test_sample_options_lists_every_option_and_uncommented_gives_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every option appears; uncommenting its `#key = value` lines changes no effective value."""
    assert run_main(["sample-options"]) == 0
    text = capsys.readouterr().out
    for option in run_options():
        assert f"# --{option.name}: " in text, option.name
    uncommented = re.sub(r"^#(?=[a-z-]+ = )", "", text, flags=re.MULTILINE)
    opts = write_options(tmp_path / "o.toml", uncommented)

    from_file = show(capsys, "--options-file", str(opts))
    defaults = show(capsys, "--options-file", "")
    assert {n: v for n, (v, _) in from_file.items()} == {n: v for n, (v, _) in defaults.items()}
    assert sum(s == f"file {opts}" for _, s in from_file.values()) >= 25


# ---- end to end -----------------------------------------------------------------------------


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    procs: list[ServiceProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(list(args), cwd=tmp_path, env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def test_service_takes_broker_and_entries_from_the_options_file_and_the_environment(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    tmp_path: Path,
    started: Callable[..., ServiceProcess],
    topic_base: str,
) -> None:
    """With no flag but --options-file, the service publishes where the file and env say."""
    topic = f"{topic_base}/from-file"
    sub = subscriber_factory(topic)
    write_config(tmp_path / "entries.json", [entry("from-file", topic, interval=3600)])
    opts = write_options(
        tmp_path / "gateway.toml",
        "\n".join(
            [
                'broker = "127.0.0.1"',
                f"port = {broker.port}",
                'config = "entries.json"',
                f'state-db = "{tmp_path / "state.db"}"',
                'log-file = ""',
                "http-port = 0",
                f'client-id = "sp-opts-{uuid.uuid4().hex[:8]}"',
                "backoff-max = 1",
                "",
            ]
        ),
    )

    proc = started(
        "run", "--options-file", str(opts), env={"SCHEDULER_PUBLISHER_STATS_INTERVAL": "0.2"}
    )

    assert sub.wait_for(topic, timeout=20)[0].json() == {"online": 1, "sensor": "from-file"}
    proc.wait_for_event("publisher_statistics", timeout=20)  # the 0.2 s interval from env
    assert not (tmp_path / "logs").exists()  # log-file = "" came from the file
