"""The command line's grammar: the commands, their flags, and each `run` option from a flag,
the environment (SCHEDULER_PUBLISHER_<OPTION>) or the options file (options.py does the
merging). main.py runs the commands.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from scheduler_publisher import __version__
from scheduler_publisher.cli.options import (
    Number,
    OptionsError,
    Origin,
    alpn_list,
    broker_list,
    environment_warnings,
    explicit_dests,
    host_name,
    host_names,
    mqtt_string,
    mqtt_topic,
    options_file_path,
    options_of,
    read_options_file,
    resolve,
    shard_spec,
)
from scheduler_publisher.cli.report import FORMATS
from scheduler_publisher.endpoints import Endpoint, Given, parse_list, shown
from scheduler_publisher.logs.setup import LogSettings
from scheduler_publisher.scheduling.plan import MAX_SLOTS, MIN_SLOTS
from scheduler_publisher.scheduling.spread import AUTO
from scheduler_publisher.settings import ServiceSettings, client_id_refusal, status_topic_refusal

__all__ = [
    "COMMANDS",
    "EXIT_USAGE",
    "UsageExit",
    "add_run_arguments",
    "apply_options",
    "build_parser",
    "normalise_argv",
    "subparser",
    "version_text",
]

EXIT_USAGE = 2  # main.py lists every exit code

COMMANDS = (
    "run",
    "validate",
    "schema",
    "show-options",
    "sample-config",
    "sample-options",
    "systemd-unit",
)
# The commands whose flags may also come from the environment and the options file.
OPTION_COMMANDS = ("run", "validate", "show-options")
# Package data: copies of JSON/payloadStaticConfig.json and the units in systemd/, kept
# identical by tests/test_packaging.py, so that a wheel carries them (docs/design.md, "Packaging").


class UsageExit(SystemExit):
    """A usage error from the command line (exit 2), already on stderr; `message` says it
    again, for the CLI's JSON line (main.py)."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USAGE)
        self.message = message


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line: `run`'s full usage is 20 lines, which buries the error."""

    def error(self, message: str) -> NoReturn:
        line = f"{self.prog}: error: {message} (see `{self.prog} --help`)"
        sys.stderr.write(line + "\n")
        raise UsageExit(message)


class _VersionAction(argparse.Action):
    """--version: this package, the libraries that shape its behaviour, and Python."""

    def __init__(
        self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None
    ) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    lines = [f"scheduler-publisher {__version__}"]
    for dist in ("paho-mqtt", "APScheduler"):
        try:
            lines.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{dist} not installed")
    lines.append(f"Python {platform.python_version()}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scheduler-publisher",
        description="Publish static JSON payloads to MQTT topics on a schedule. "
        "`run` is the default command. Every option of `run` can also come from "
        "SCHEDULER_PUBLISHER_<OPTION> or the options file; precedence: flag > "
        "environment > options file > default.",
        epilog="Exit codes: 0 ok, 1 invalid config (validate), 2 usage, 3 config unusable at "
        "start, 4 gave up connecting (--max-retries), 5 other start-up failure, 6 state "
        "database or log file in use by another process.",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the versions of this program, paho-mqtt, APScheduler and Python",
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the publisher (default)")
    add_run_arguments(run)
    validate = sub.add_parser("validate", help="check the config file; connect nowhere")
    validate.add_argument(
        "--config",
        type=Path,
        default=ServiceSettings().config_path,
        help="config file (default: %(default)s)",
    )
    validate.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text (default; problems on stderr as file:line:column), json "
        "(one object on stdout) or github (workflow annotations)",
    )
    _add_shard(validate, "list the entries shard K of N would run")
    _add_options_file(validate)
    sub.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the entries file")
    show = sub.add_parser(
        "show-options",
        help="print every option's effective value and "
        "where it came from (flag, env, file, default)",
    )
    add_run_arguments(show)
    sub.add_parser("sample-config", help="print the sample entries file")
    sub.add_parser("sample-options", help="print a commented options file with every default")
    unit = sub.add_parser("systemd-unit", help="print the systemd unit")
    unit.add_argument(
        "--template",
        action="store_true",
        help="print the template unit scheduler-publisher@.service instead: one "
        "instance per shard, named K-of-N (docs/scaling.md)",
    )
    return parser


def _add_options_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--options-file",
        type=Path,
        default=None,
        help="TOML file of options, keys named like the long flags; '' for none "
        "(default: /etc/scheduler-publisher/scheduler-publisher.toml when it "
        "exists)",
    )


def _add_shard(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    p.add_argument(
        "--shard",
        type=shard_spec,
        metavar="K/N",
        help=f"{what}: one entries file split across N processes or hosts by a "
        f"stable hash of the entry id; 1 <= K <= N <= 1024, K-of-N also "
        f"accepted (docs/scaling.md)",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    d = ServiceSettings()
    _add_options_file(p)
    _add_broker_arguments(p)
    _add_tls_arguments(p)
    _add_config_arguments(p, d)
    _add_operations_arguments(p, d)
    _add_quick_start_arguments(p)


def _add_broker_arguments(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("broker")
    b.add_argument(
        "--broker",
        type=broker_list,
        default="localhost",
        help="MQTT broker: host, host:port, or a mqtt://, mqtts://, ws:// or wss:// URL "
        "(ports 1883, 8883, 80, 443; WebSocket path /mqtt) (default: localhost)",
    )
    b.add_argument(
        "--port",
        type=Number(int, 1, 65535),
        default=None,
        help="broker port, for a broker given without one (default: 1883, 8883 with --tls)",
    )
    b.add_argument("--username", type=mqtt_string, help="MQTT user name")
    b.add_argument(
        "--password",
        help="MQTT password; visible in `ps`: prefer --password-file, "
        "$MQTT_PASSWORD or systemd credentials",
    )
    b.add_argument("--password-file", type=Path, help="file whose first line is the password")
    b.add_argument(
        "--client-id",
        type=mqtt_string,
        help="MQTT client id (default: stable per host and config file)",
    )
    b.add_argument(
        "--mqtt-version", choices=("5", "3.1.1"), default="5", help="protocol version (default: 5)"
    )
    b.add_argument(
        "--keepalive",
        type=Number(int, 1, 65535),
        default=30,
        help="seconds, 1 to 65535 (default: 30)",
    )
    b.add_argument(
        "--backoff-min",
        type=Number(float, 0.01, 3600),
        default=1.0,
        help="first reconnect delay, seconds (default: 1)",
    )
    b.add_argument(
        "--backoff-max",
        type=Number(float, 0.01, 86400),
        default=60.0,
        help="longest reconnect delay, seconds (default: 60)",
    )
    b.add_argument(
        "--max-retries",
        type=Number(int, 1),
        default=None,
        help="give up (exit 4) after N failed attempts in a row (default: forever)",
    )
    b.add_argument(
        "--will-delay",
        type=Number(int, 0, 2**32 - 1),
        default=0,
        help="MQTT 5 Will Delay Interval, seconds (default: 0)",
    )
    b.add_argument(
        "--status-topic",
        type=mqtt_topic,
        help="retained service status topic (default: scheduler-publisher/<client-id>/status)",
    )
    b.add_argument(
        "--connect-rate",
        type=Number(float, 0.1, 100_000),
        default=200.0,
        help="connection attempts per second across all connections (default: 200)",
    )


def _add_tls_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("TLS")
    t.add_argument("--tls", action="store_true", help="connect with TLS (server verified)")
    t.add_argument("--cafile", type=Path, help="CA bundle to verify the broker with")
    t.add_argument("--certfile", type=Path, help="client certificate (mutual TLS)")
    t.add_argument("--keyfile", type=Path, help="client key (mutual TLS)")
    t.add_argument(
        "--tls-insecure",
        action="store_true",
        help="DANGEROUS: skip certificate and host name verification",
    )
    t.add_argument(
        "--tls-alpn",
        type=alpn_list,
        metavar="PROTOCOL[,PROTOCOL]",
        help="ALPN protocols offered in the TLS handshake (AWS IoT Core on 443: x-amzn-mqtt-ca)",
    )


def _add_config_arguments(p: argparse.ArgumentParser, d: ServiceSettings) -> None:
    c = p.add_argument_group("config")
    c.add_argument("--config", type=Path, default=d.config_path, help="default: %(default)s")
    c.add_argument("--no-watch", action="store_true", help="do not watch the file for edits")
    c.add_argument(
        "--force-polling", action="store_true", help="watch by polling instead of inotify"
    )
    c.add_argument(
        "--clear-retained-on-remove",
        action="store_true",
        help="clear a removed retained entry's message from the broker",
    )
    c.add_argument(
        "--max-config-bytes",
        type=Number(int, 2, 2**30),
        default=d.max_config_bytes,
        help="largest config file accepted (default: 16 MiB)",
    )
    c.add_argument(
        "--phase-slots",
        type=Number(int, MIN_SLOTS, MAX_SLOTS, words=(AUTO,)),
        default=AUTO,
        help="phase groups per period that interval entries are spread over (1 to "
        "100); fewer cost less CPU and load the broker in bigger bursts. "
        "auto (the default): groups of about 100 entries of an interval, 50 "
        "from 2,000 entries on",
    )
    _add_shard(
        c,
        "run only the entries of shard K of N; the client id and status topic get a -K-of-N suffix",
    )


def _add_operations_arguments(p: argparse.ArgumentParser, d: ServiceSettings) -> None:
    o = p.add_argument_group("operations")
    o.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="least severe level logged (default: INFO)",
    )
    o.add_argument(
        "--log-format",
        choices=("json", "console"),
        default="json",
        help="stdout format (the log file is always JSON)",
    )
    o.add_argument(
        "--log-file",
        default="logs/mqtt_publisher.log",
        help="rotated JSON log file; '' for none (default: %(default)s). Reopened on SIGHUP "
        "and when it is moved or deleted (logrotate)",
    )
    o.add_argument(
        "--log-file-max-bytes",
        type=Number(int, 0, 2**40),
        default=LogSettings().file_max_bytes,
        help="rotate the log file at this size; 0: never (logrotate does it) (default: 10 MiB)",
    )
    o.add_argument(
        "--log-file-backups",
        type=Number(int, 1, 1000),
        default=LogSettings().file_backups,
        help="rotated log files kept (default: %(default)s)",
    )
    o.add_argument(
        "--stats-interval",
        type=Number(float, 0.1, 86400),
        default=d.stats_interval,
        help="seconds between publisher_statistics events (default: 60)",
    )
    o.add_argument(
        "--state-db",
        default=str(d.state_db),
        help="SQLite file for counters across restarts; '' for none (default: %(default)s)",
    )
    o.add_argument(
        "--checkpoint-interval",
        type=Number(float, 0.1, 86400),
        default=d.checkpoint_interval,
        help="seconds between state checkpoints (default: 5)",
    )
    o.add_argument(
        "--history-retention",
        type=Number(int, 1, 10**9),
        default=d.history_retention_rows,
        help="statistics history rows kept (default: 10000)",
    )
    o.add_argument(
        "--history-interval",
        type=Number(float, 0.1, 86400),
        default=d.history_interval,
        help="seconds between statistics history rows (default: 60)",
    )
    o.add_argument("--http-host", type=host_name, default=d.http_host, help="default: %(default)s")
    o.add_argument(
        "--http-port",
        type=Number(int, 0, 65535),
        default=d.http_port,
        help="health/status/metrics port; 0 turns HTTP off (default: 8080)",
    )
    o.add_argument("--http-token-file", type=Path, help="bearer token required for POST /reload")
    o.add_argument(
        "--http-allowed-hosts",
        type=host_names,
        default="",
        metavar="NAMES",
        help="names HTTP answers to in the Host header besides localhost, IP addresses and "
        "--http-host, separated by commas; '*' for any (default: any when --http-host is "
        "0.0.0.0 or ::, else none)",
    )
    o.add_argument(
        "--metrics-per-entry",
        choices=("auto", "on", "off"),
        default=d.metrics_per_entry,
        help="per-entry series in /metrics; auto: only up to --metrics-entry-limit "
        "entries (default: %(default)s)",
    )
    o.add_argument(
        "--metrics-entry-limit",
        type=Number(int, 1),
        default=d.metrics_entry_limit,
        help="most entries with per-entry series under auto (default: %(default)s)",
    )


def _add_quick_start_arguments(p: argparse.ArgumentParser) -> None:
    x = p.add_argument_group("quick start")
    x.add_argument(
        "--embedded-broker",
        action="store_true",
        help="start an in-process broker (amqtt, MQTT 3.1.1) and publish to it",
    )
    x.add_argument("--echo", action="store_true", help="print every message on the broker")


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """`run` is the default command: `scheduler-publisher --broker X` means `run --broker X`."""
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version")):
        args.insert(0, "run")
    return args


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    # argparse keeps subparsers only in its private action list (see options.py's docstring).
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    raise LookupError(command)


def apply_options(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    args: argparse.Namespace,
    environ: Mapping[str, str],
) -> dict[str, Origin]:
    """Fill the options no flag gave from the environment and the options file (raises
    OptionsError); returns where each option came from. Sets `args.options_file` to the file
    actually read (None for none)."""
    if args.command not in OPTION_COMMANDS:
        return {}
    every = options_of(subparser(parser, "run"))
    command = subparser(parser, args.command)
    explicit = explicit_dests(command, argv[1:])
    path = options_file_path(args.options_file, "options_file" in explicit, environ)
    values = read_options_file(path, every) if path is not None else {}
    # Only the service's options come from elsewhere: a command's own flag (validate --format)
    # is about this invocation, not the service.
    service = {option.name for option in every}
    own = [option for option in options_of(command) if option.name in service]
    origins = resolve(own, args, explicit, environ, values, path)
    args.options_file = path
    check_combinations(args, origins)
    for warning in environment_warnings(every, environ):
        print(f"scheduler-publisher: warning: {warning}", file=sys.stderr)
    return origins


def check_combinations(args: argparse.Namespace, origins: Mapping[str, Origin]) -> None:
    """Checks that involve two options, after every source has been merged."""
    low, high = getattr(args, "backoff_min", None), getattr(args, "backoff_max", None)
    if low is not None and high is not None and low > high:
        raise OptionsError(
            f"backoff-min ({low:g}, {origins['backoff-min']}) must not be larger "
            f"than backoff-max ({high:g}, {origins['backoff-max']})"
        )
    if getattr(args, "keyfile", None) and not getattr(args, "certfile", None):
        raise OptionsError(
            f"keyfile ({origins['keyfile']}) needs certfile, the client certificate it belongs to"
        )
    if getattr(args, "broker", None) is not None:
        broker_endpoints(args, origins)
    _check_derived_names(args, origins)


# The options that turn TLS on for a broker given as a bare host (main.tls_context).
TLS_OPTIONS = ("tls", "cafile", "certfile", "tls-insecure", "tls-alpn")


def tls_asked(args: argparse.Namespace) -> str | None:
    """The first TLS option given, or None: any of them turns TLS on for a bare host."""
    for name in TLS_OPTIONS:
        if getattr(args, name.replace("-", "_"), None):
            return name
    return None


def broker_endpoints(
    args: argparse.Namespace, origins: Mapping[str, Origin]
) -> tuple[Endpoint, ...]:
    """--broker's brokers with --port and the TLS options applied; an OptionsError where the
    two say different things (a URL's port against --port, mqtt:// against --tls, mqtts://
    against tls = false, a TLS file or ALPN that no broker would use), naming both and where
    each came from."""
    given = parse_list(args.broker)  # valid: its argparse type checked it
    asked = tls_asked(args)
    endpoints = tuple(_resolved(g, args, origins, asked) for g in given)
    twice = next((e for i, e in enumerate(endpoints) if e in endpoints[:i]), None)
    if twice is not None:
        raise OptionsError(
            f"broker ({_origin(origins, 'broker')}) names {twice.url} twice in "
            f"{shown(args.broker)}; list each broker once"
        )
    if asked is not None and not any(e.tls for e in endpoints):
        raise OptionsError(
            f"{asked} ({_origin(origins, asked)}) is for TLS, but no broker uses TLS: "
            f"broker ({_origin(origins, 'broker')}) is {shown(args.broker)}; write mqtts:// "
            f"or wss://, or drop {asked}"
        )
    return endpoints


def _resolved(
    given: Given, args: argparse.Namespace, origins: Mapping[str, Origin], asked: str | None
) -> Endpoint:
    where = f"broker ({_origin(origins, 'broker')}) {shown(given.text)}"
    if given.port is not None and args.port is not None and given.port != args.port:
        raise OptionsError(
            f"{where} says port {given.port}, but port ({_origin(origins, 'port')}) is "
            f"{args.port}; give the port in one place"
        )
    # --tls says "this broker uses TLS"; the other TLS options only say how, for the TLS
    # brokers of a list (checked above as a whole).
    if given.scheme in ("mqtt", "ws") and args.tls:
        raise OptionsError(
            f"{where} is {given.scheme}:// without TLS, but tls ({_origin(origins, 'tls')}) "
            f"asks for TLS; write {given.scheme}s:// or drop tls"
        )
    tls_origin = _origin(origins, "tls")
    if given.scheme in ("mqtts", "wss") and not args.tls and tls_origin.source != "default":
        raise OptionsError(
            f"{where} is {given.scheme}:// (TLS), but tls ({tls_origin}) is false; "
            f"write {given.scheme[:-1]}:// or drop tls"
        )
    return given.endpoint(args.port, asked is not None)


def _origin(origins: Mapping[str, Origin], name: str) -> Origin:
    return origins.get(name, Origin("default"))


def _check_derived_names(args: argparse.Namespace, origins: Mapping[str, Origin]) -> None:
    """A client id or status topic that fits alone but not with what is derived from it (the
    shard's suffix, the status topic around the client id) would fail at every connect."""
    client_id, topic = getattr(args, "client_id", None), getattr(args, "status_topic", None)
    shard = getattr(args, "shard", None)
    refusal = client_id_refusal(client_id, shard, topic) if client_id else None
    if refusal:
        raise OptionsError(f"client-id ({origins['client-id']}): {refusal}")
    refusal = status_topic_refusal(topic, shard) if topic else None
    if refusal:
        raise OptionsError(f"status-topic ({origins['status-topic']}): {refusal}")
