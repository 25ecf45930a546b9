"""Command line: running the commands, secrets, settings, exit codes. The only module that
calls sys.exit. The commands' grammar, and where each option came from, is arguments.py's.

Exit codes (also in docs/options.md):
  0  stopped cleanly (SIGTERM/SIGINT), or `validate` found the file valid
  1  `validate` found problems in the file
  2  usage error (unknown flag, bad value, from a flag, the environment or the options file);
     `run` logs it as JSON on stdout too, and the systemd units do not restart on it
  3  the config file cannot be used at start-up (missing, unreadable, not JSON, not an array,
     too big)
  4  gave up connecting after --max-retries failed attempts in a row
  5  another start-up failure (password or TLS files unreadable, HTTP token, state DB,
     embedded broker)
  6  the state database or the log file is in use by another process (its pid in the
     message): one process writes each (the systemd units do not restart on it)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import ssl
import stat
import sys
import textwrap
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

from scheduler_publisher.cli import arguments
from scheduler_publisher.cli.arguments import apply_options, build_parser, normalise_argv
from scheduler_publisher.cli.demo import (
    DemoError,
    EchoSubscriber,
    EmbeddedBroker,
    quiet_broker_logs,
)
from scheduler_publisher.cli.options import (
    SECRET_OPTIONS,
    Option,
    OptionsError,
    Origin,
    options_of,
)
from scheduler_publisher.cli.report import Report, github_plain, render, terminal_safe
from scheduler_publisher.cli.secrets import password_sources
from scheduler_publisher.config.loader import ConfigFileError, ConfigurationLoader, read_config_file
from scheduler_publisher.config.schema import schema_text
from scheduler_publisher.endpoints import Endpoint
from scheduler_publisher.logs.setup import (
    LogSettings,
    configure_logging,
    echo_line,
    get_logger,
    log_startup_failure,
    register_secret,
    reopen_log_file,
)
from scheduler_publisher.logs.writer_lock import FileInUseError
from scheduler_publisher.mqtt.descriptors import raise_soft_limit
from scheduler_publisher.scheduling.spread import AUTO
from scheduler_publisher.settings import (
    BrokerSettings,
    MQTTVersion,
    ServiceSettings,
    default_client_id,
    shard_path,
)
from scheduler_publisher.statestore import StateStoreError

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = arguments.EXIT_USAGE
EXIT_CONFIG = 3
EXIT_GAVE_UP = 4
EXIT_STARTUP = 5
EXIT_IN_USE = 6

SAMPLE_CONFIG = "payloadStaticConfig.json"
SYSTEMD_UNIT = "scheduler-publisher.service"
SYSTEMD_TEMPLATE_UNIT = "scheduler-publisher@.service"
log = get_logger("scheduler_publisher.cli")


class StartupError(Exception):
    """A start-up problem with a one-line explanation (exit code 5)."""


# ---- show-options, sample-options, sample-config, systemd-unit --------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # JSON strings are TOML basic strings


def _derived_default(name: str, args: argparse.Namespace) -> Any:
    """What the service uses for an option left unset, where that is computed at start."""
    if name == "port":
        return endpoints_of(args)[0].port
    return None


def broker_names(args: argparse.Namespace) -> BrokerSettings:
    """The client id and status topic the service connects with: given, or derived from the
    host and the config file's path; with --shard, the shard's suffix added. `run`'s settings
    and `show-options` both take them from here, so that an ACL written from show-options'
    output fits the running service."""
    names = BrokerSettings(
        client_id=args.client_id or default_client_id(args.config), status_topic=args.status_topic
    )
    shard = getattr(args, "shard", None)
    return names.for_shard(shard) if shard else names


def _named(name: str, args: argparse.Namespace, origin: Origin) -> tuple[str, str]:
    """client-id and status-topic as the service uses them, and where they came from."""
    names = broker_names(args)
    given = args.client_id if name == "client-id" else args.status_topic
    value = names.client_id if name == "client-id" else names.effective_status_topic
    if given is None:
        return value, f"{origin} (derived)"
    return value, f"{origin} (derived: --shard)" if value != given else str(origin)


_PATH_OPTIONS = {"state-db": "state_db", "log-file": "log_file"}


def shard_own_path(args: argparse.Namespace, name: str) -> Path | None:
    """With --shard, a path option (state-db, log-file) left at its default or set in the
    options file: the shard's own file (`logs/state-1-of-2.db`), so that shards started in
    one folder, or the template unit's instances (which share the options file), share
    neither file (docs/scaling.md). None otherwise: a flag or a variable (the template's
    per-instance `.env`) is taken as it is."""
    shard = getattr(args, "shard", None)
    origin = getattr(args, "origins", {}).get(name)
    value = getattr(args, _PATH_OPTIONS[name], None) if name in _PATH_OPTIONS else None
    if shard is None or origin is None or origin.source not in ("default", "file") or not value:
        return None
    return shard_path(Path(value), shard)


def show_options_text(
    args: argparse.Namespace,
    origins: Mapping[str, Origin],
    options: Sequence[Option],
    environ: Mapping[str, str],
) -> str:
    """One `key = value  # source` line per option, secrets redacted."""
    lines = [
        f"# options file: {args.options_file or 'none'}",
        "# precedence: flag > environment > options file > default",
    ]
    for option in options:
        value, origin = getattr(args, option.dest), str(origins[option.name])
        own = shard_own_path(args, option.name)
        if own is not None:
            value, origin = str(own), f"{origin} (derived: --shard)"
        if option.name == "password":
            lines += _password_lines(args, origins, environ)
            continue
        if option.name in ("client-id", "status-topic"):
            value, origin = _named(option.name, args, origins[option.name])
        if option.name == "broker":  # the URLs the service connects to, never a password
            value = ",".join(e.url for e in endpoints_of(args))
        if value is None:
            derived = _derived_default(option.name, args)
            if derived is None:
                lines.append(f"# {option.name} is not set  # {origin}")
                continue
            value, origin = derived, f"{origin} (derived)"
        shown = '"<redacted>"' if option.name in SECRET_OPTIONS else _toml_value(value)
        lines.append(f"{option.name} = {shown}  # {origin}")
    return "\n".join(lines)


def _password_lines(
    args: argparse.Namespace, origins: Mapping[str, Origin], environ: Mapping[str, str]
) -> list[str]:
    """The password's line names the place it is read from; a line per place it beat."""
    sources = password_sources(args, origins, environ)
    if not sources:
        return [f"# password is not set  # {origins['password']}"]
    chosen, *beaten = sources
    return [
        f'password = "<redacted>"  # {chosen.origin}',
        *(f"# password from {b.origin} is not used: {chosen.origin} comes first" for b in beaten),
    ]


def sample_options_text(options: Sequence[Option]) -> str:
    """A commented TOML options file: every option, its help and its default."""
    out = [
        '# scheduler-publisher options file (TOML). Keys are the long flags without "--".',
        "# Precedence: flag > SCHEDULER_PUBLISHER_<OPTION> > this file > default.",
        "# Uncomment and edit what you need; `scheduler-publisher show-options` prints the",
        "# effective values and where each came from.",
    ]
    for option in options:
        action = option.action
        helptext = (action.help or "").replace("%(default)s", str(action.default))
        out += [
            "",
            *textwrap.wrap(
                f"--{option.name}: {helptext}", 90, initial_indent="# ", subsequent_indent="#   "
            ),
        ]
        if action.choices is not None:
            out.append(f"# one of: {', '.join(str(c) for c in action.choices)}")
        if action.default is None:
            out.append(f"# {option.name}: not set by default ({option.kind})")
        else:
            out.append(f"#{option.name} = {_toml_value(action.default)}")
    return "\n".join(out)


def package_text(name: str) -> str:
    return resources.files("scheduler_publisher").joinpath("data", name).read_text("utf-8")


def cmd_show_options(args: argparse.Namespace) -> int:
    options = options_of(arguments.subparser(build_parser(), "show-options"))
    print(show_options_text(args, args.origins, options, os.environ))
    return EXIT_OK


def cmd_sample_options(_args: argparse.Namespace) -> int:
    print(sample_options_text(options_of(arguments.subparser(build_parser(), "run"))))
    return EXIT_OK


def cmd_sample_config(_args: argparse.Namespace) -> int:
    sys.stdout.write(package_text(SAMPLE_CONFIG))
    return EXIT_OK


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    sys.stdout.write(package_text(SYSTEMD_TEMPLATE_UNIT if args.template else SYSTEMD_UNIT))
    return EXIT_OK


# ---- run --------------------------------------------------------------------------------------


def read_password(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The password from the strongest place that gives one (secrets.py says which)."""
    sources = password_sources(args, getattr(args, "origins", {}), environ)
    if not sources:
        return None
    chosen = sources[0]
    if chosen.path is not None:
        return _first_line(chosen.path, chosen.reading, "password")
    return chosen.text


MAX_SECRET_FILE = 64 * 1024  # a password or token file is one line; /dev/zero is not one


def _first_line(path: Path, what: str, secret: str) -> str:
    """The secret on the first line of a regular file, stripped; a StartupError naming the
    file and the secret when there is none (an empty first line is never an empty secret)."""
    where = f"{what} {path}"
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would hang, a device never end
            raise StartupError(f"{where}: not a regular file; expected one with the {secret}")
        with path.open("rb") as stream:
            data = stream.read(MAX_SECRET_FILE + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"{where}: cannot read the {secret} from it ({exc})") from None
    if len(data) > MAX_SECRET_FILE:
        raise StartupError(
            f"{where}: over {MAX_SECRET_FILE} bytes; expected one line, the {secret}"
        )
    lines = text.splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        found = "the file is empty" if not text.strip() else "its first line is empty"
        raise StartupError(f"{where}: {found}; write the {secret} on the first line")
    return value


def read_http_token(path: Path) -> str:
    """--http-token-file's first line. Printable ASCII only: a header carries no other
    characters reliably (a browser's fetch() refuses them), so any other is refused here
    rather than never matching."""
    token = _first_line(path, "--http-token-file", "HTTP bearer token")
    if not (token.isascii() and token.isprintable()):
        raise StartupError(
            f"--http-token-file {path}: the token must be printable ASCII characters, "
            "got other characters on the first line"
        )
    return token


def tls_context(args: argparse.Namespace, endpoints: Sequence[Endpoint]) -> ssl.SSLContext | None:
    """The one context every TLS broker is verified with (mqtts://, wss://, or a bare host with
    a TLS option); None when no broker uses TLS."""
    if not any(e.tls for e in endpoints):
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(args.cafile) if args.cafile else None)
        if args.certfile:
            ctx.load_cert_chain(str(args.certfile), str(args.keyfile) if args.keyfile else None)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"TLS files: {exc}") from None
    if args.tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if args.tls_alpn:
        ctx.set_alpn_protocols(args.tls_alpn.split(","))
    return ctx


def endpoints_of(args: argparse.Namespace) -> tuple[Endpoint, ...]:
    """The brokers the service connects to, in order: the embedded broker's, or --broker's with
    --port and the TLS options applied (checked by arguments.check_combinations already)."""
    if getattr(args, "embedded_broker", False):
        return (Endpoint("mqtt", "127.0.0.1", args.port or 1883),)
    return arguments.broker_endpoints(args, getattr(args, "origins", {}))


def build_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> ServiceSettings:
    password = read_password(args, environ)
    if password:
        register_secret(password)
    token = read_http_token(args.http_token_file) if args.http_token_file else None
    if token:
        register_secret(token)
    endpoints = endpoints_of(args)
    ctx = tls_context(args, endpoints)
    protocol: MQTTVersion = "3.1.1" if args.embedded_broker else args.mqtt_version
    broker = dataclasses.replace(
        broker_names(args),
        host=endpoints[0].host,
        port=endpoints[0].port,
        endpoints=endpoints,
        username=args.username,
        password=password,
        protocol=protocol,
        keepalive=args.keepalive,
        backoff_min=args.backoff_min,
        backoff_max=args.backoff_max,
        max_retries=args.max_retries,
        will_delay=args.will_delay,
        connect_rate=args.connect_rate,
        tls_context=ctx,
        tls_insecure=args.tls_insecure,
    )
    settings = ServiceSettings(
        config_path=args.config,
        broker=broker,
        logging=log_settings(args),
        stats_interval=args.stats_interval,
        state_db=_state_db(args),
        state_db_predecessor=Path(args.state_db) if shard_own_path(args, "state-db") else None,
        checkpoint_interval=args.checkpoint_interval,
        history_interval=args.history_interval,
        history_retention_rows=args.history_retention,
        http_host=args.http_host,
        http_port=args.http_port,
        http_token=token,
        http_allowed_hosts=tuple(filter(None, args.http_allowed_hosts.split(","))),
        metrics_per_entry=args.metrics_per_entry,
        metrics_entry_limit=args.metrics_entry_limit,
        clear_retained_on_remove=args.clear_retained_on_remove,
        watch=not args.no_watch,
        force_polling=args.force_polling,
        max_config_bytes=args.max_config_bytes,
        phase_slots=None if args.phase_slots == AUTO else args.phase_slots,
    )
    # broker_names() has given the broker the shard's names already
    return dataclasses.replace(settings, shard=args.shard)


def _state_db(args: argparse.Namespace) -> Path | None:
    own = shard_own_path(args, "state-db")
    return own or (Path(args.state_db) if args.state_db else None)


def log_settings(args: argparse.Namespace) -> LogSettings:
    own = shard_own_path(args, "log-file")
    return LogSettings(
        level=args.log_level,
        format=args.log_format,
        file=own or (Path(args.log_file) if args.log_file else None),
        file_max_bytes=args.log_file_max_bytes,
        file_backups=args.log_file_backups,
    )


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        report = Report(
            str(args.config),
            ConfigurationLoader(args.config).load(),
            shard=args.shard,
            now=datetime.now(UTC),
        )
    except ConfigFileError as exc:
        report = Report(str(args.config), None, exc, shard=args.shard)
    out, err = render(report, args.format)
    if report.failure is not None and args.format == "text":
        err.append(terminal_safe(config_hint(args.config)))
    for line in err:
        print(line, file=sys.stderr)
    for line in out:
        print(line)
    return EXIT_OK if report.valid else EXIT_INVALID


def cmd_schema(_args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # Until the service exists, remember SIGTERM/SIGINT/SIGHUP instead of dying of them (the
    # default action): a stop during start-up must still end with a clean shutdown and exit 0.
    early: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: early.add(signum))
    if args.tls_insecure:
        print("WARNING: --tls-insecure: the broker's certificate is NOT verified", file=sys.stderr)
    settings = build_settings(args, dict(os.environ))
    # Stdout only until the config file is known to be readable: the log file's handler creates
    # its folder (./logs/ by default), and a start that fails on a missing or unreadable file
    # must leave nothing behind. Lines logged meanwhile are still JSON on stdout.
    configure_logging(dataclasses.replace(settings.logging, file=None))
    read_config_file(settings.config_path, max_bytes=settings.max_config_bytes)
    configure_logging(settings.logging)
    raise_soft_limit()  # before any connection: the lwt connections' budget is sized from it
    if args.tls_insecure:
        log.warning(
            "tls_verification_disabled",
            hint="anyone on the path can impersonate the broker and read the credentials",
        )
    extras = _start_demo(args, settings)
    try:
        return _run_service(settings, early)
    finally:
        for part in reversed(extras):
            part.stop()


def _start_demo(
    args: argparse.Namespace, settings: ServiceSettings
) -> list[EmbeddedBroker | EchoSubscriber]:
    parts: list[EmbeddedBroker | EchoSubscriber] = []
    if args.embedded_broker:
        quiet_broker_logs(settings.logging.level)
        broker = EmbeddedBroker(settings.broker.port)
        broker.start()
        parts.append(broker)
    if args.echo:
        echo = EchoSubscriber(settings.broker.host, settings.broker.port, _print_message)
        echo.start()
        parts.append(echo)
    return parts


def _print_message(topic: str, payload: bytes, retained: bool) -> None:
    mark = " (retained)" if retained else ""
    echo_line(f"echo {topic}{mark}: {payload.decode('utf-8', 'replace')}")


def _run_service(settings: ServiceSettings, early: set[int]) -> int:
    from scheduler_publisher.service import PublisherService  # noqa: PLC0415 - after logging setup

    service = PublisherService(settings)

    # A handler runs on the main thread between two bytecodes, possibly while that thread holds
    # the mailbox lock or the wake Event's lock (the main loop is this thread): taking them
    # here could deadlock. Hand the request to a short-lived thread instead.
    def stop(_sig: int, _frame: FrameType | None) -> None:
        threading.Thread(target=service.request_stop, name="signal-stop", daemon=True).start()

    def hang_up() -> None:
        reopen_log_file()  # logrotate's `postrotate` sends SIGHUP after it renamed the file
        service.request_reload()

    def reload(_sig: int, _frame: FrameType | None) -> None:
        threading.Thread(target=hang_up, name="signal-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    if early & {signal.SIGTERM, signal.SIGINT}:
        service.request_stop()
    elif signal.SIGHUP in early:
        service.request_reload()
    service.run()
    return EXIT_GAVE_UP if service.gave_up else EXIT_OK


def config_hint(path: Path) -> str:
    """What to do about a config file that cannot be used: a missing one usually means the
    default relative path from the wrong folder, or a wheel install without the git tree."""
    if path.exists():
        return (
            f"Fix the file (check it with `scheduler-publisher validate --config {path}`) "
            f"and start again."
        )
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    return (
        f"No config file at {path}{where}. Give its path with --config PATH (or `config = "
        f'"PATH"` in the options file); `scheduler-publisher sample-config > PATH` '
        f"writes a sample."
    )


COMMAND_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "show-options": cmd_show_options,
    "sample-config": cmd_sample_config,
    "sample-options": cmd_sample_options,
    "systemd-unit": cmd_systemd_unit,
}


class UsageError(Exception):
    """A flag, variable or options-file value that cannot be used (exit 2)."""


def _log_usage_error(command: str, message: str) -> None:
    """A usage error of `run` is also one JSON line on stdout, as exits 3, 5 and 6 are: a log
    shipper and the journal (at priority 3) see why the service did not start. Stdout only,
    as JSON: the log options may be the very values that were refused. The other commands
    are run by hand, and their stdout is their answer (validate --format json)."""
    if command == "run":
        log_startup_failure(LogSettings(file=None), UsageError(message), exit_code=EXIT_USAGE)


def _parse(parser: argparse.ArgumentParser, raw: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(raw)
    except arguments.UsageExit as exc:
        _log_usage_error(raw[0], exc.message)
        raise


def main(argv: Sequence[str] | None = None) -> None:
    raw = normalise_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = _parse(parser, raw)
    try:
        args.origins = apply_options(parser, raw, args, os.environ)
    except OptionsError as exc:
        error = terminal_safe(f"scheduler-publisher {args.command}: error: {exc}")
        # validate --format github: an options file's key must not become a workflow command
        shown = github_plain([error]) if getattr(args, "format", None) == "github" else [error]
        print(*shown, sep="\n", file=sys.stderr)
        _log_usage_error(args.command, str(exc))
        sys.exit(EXIT_USAGE)
    try:
        code = COMMAND_HANDLERS[args.command](args)
    except ConfigFileError as exc:
        print(
            f"scheduler-publisher: cannot start: {exc}\n{config_hint(args.config)}", file=sys.stderr
        )
        code = EXIT_CONFIG
        log_startup_failure(log_settings(args), exc, exit_code=code)
    except (StartupError, DemoError, StateStoreError) as exc:
        print(f"scheduler-publisher: cannot start: {exc}", file=sys.stderr)
        code = EXIT_STARTUP
        log_startup_failure(log_settings(args), exc, exit_code=code)
    except FileInUseError as exc:
        print(f"scheduler-publisher: cannot start: {exc}", file=sys.stderr)
        code = EXIT_IN_USE
        log_startup_failure(log_settings(args), exc, exit_code=code)
    sys.exit(code)
