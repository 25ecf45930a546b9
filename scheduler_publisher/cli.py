"""Command line: argument parsing, secrets, exit codes. The only module that calls sys.exit.

Exit codes (also in the README):
  0  stopped cleanly (SIGTERM/SIGINT), or `validate` found the file valid
  1  `validate` found problems in the file
  2  usage error (unknown flag, bad value)
  3  the config file cannot be used at start-up (unreadable, not JSON, not an array, too big)
  4  gave up connecting after --max-retries failed attempts in a row
  5  another start-up failure (password or TLS files unreadable, HTTP token, state DB,
     embedded broker)
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from scheduler_publisher import __version__
from scheduler_publisher.config import ConfigFileError, ConfigurationLoader
from scheduler_publisher.demo import DemoError, EchoSubscriber, EmbeddedBroker
from scheduler_publisher.logs import LogSettings, configure_logging, get_logger, register_secret
from scheduler_publisher.settings import (
    BrokerSettings,
    MQTTVersion,
    ServiceSettings,
    default_client_id,
)
from scheduler_publisher.statestore import StateStoreError

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_GAVE_UP = 4
EXIT_STARTUP = 5

COMMANDS = ("run", "validate")
log = get_logger("scheduler_publisher.cli")


class StartupError(Exception):
    """A start-up problem with a one-line explanation (exit code 5)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scheduler-publisher",
        description="Publish static JSON payloads to MQTT topics on a schedule. "
                    "`run` is the default command.",
        epilog="Exit codes: 0 ok, 1 invalid config (validate), 2 usage, 3 config unusable at "
               "start, 4 gave up connecting (--max-retries), 5 other start-up failure.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the publisher (default)")
    _add_run_arguments(run)
    validate = sub.add_parser("validate", help="check the config file; connect nowhere")
    validate.add_argument("--config", type=Path, default=ServiceSettings().config_path,
                          help="config file (default: %(default)s)")
    return parser


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    d = ServiceSettings()
    b = p.add_argument_group("broker")
    b.add_argument("--broker", default="localhost", help="MQTT broker host (default: localhost)")
    b.add_argument("--port", type=int, default=None, help="broker port (default: 1883, 8883 "
                   "with --tls)")
    b.add_argument("--username", help="MQTT user name")
    b.add_argument("--password", help="MQTT password; visible in `ps`: prefer --password-file, "
                   "$MQTT_PASSWORD or systemd credentials")
    b.add_argument("--password-file", type=Path, help="file whose first line is the password")
    b.add_argument("--client-id", help="MQTT client id (default: stable per host and config "
                   "file)")
    b.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5",
                   help="protocol version (default: 5)")
    b.add_argument("--keepalive", type=int, default=30, help="seconds (default: 30)")
    b.add_argument("--backoff-min", type=float, default=1.0,
                   help="first reconnect delay, seconds (default: 1)")
    b.add_argument("--backoff-max", type=float, default=60.0,
                   help="longest reconnect delay, seconds (default: 60)")
    b.add_argument("--max-retries", type=int, default=None,
                   help="give up (exit 4) after N failed attempts in a row (default: forever)")
    b.add_argument("--will-delay", type=int, default=0,
                   help="MQTT 5 Will Delay Interval, seconds (default: 0)")
    b.add_argument("--status-topic", help="retained service status topic "
                   "(default: scheduler-publisher/<client-id>/status)")
    b.add_argument("--connect-rate", type=float, default=200.0,
                   help="connection attempts per second across all connections (default: 200)")
    t = p.add_argument_group("TLS")
    t.add_argument("--tls", action="store_true", help="connect with TLS (server verified)")
    t.add_argument("--cafile", type=Path, help="CA bundle to verify the broker with")
    t.add_argument("--certfile", type=Path, help="client certificate (mutual TLS)")
    t.add_argument("--keyfile", type=Path, help="client key (mutual TLS)")
    t.add_argument("--tls-insecure", action="store_true",
                   help="DANGEROUS: skip certificate and host name verification")
    c = p.add_argument_group("config")
    c.add_argument("--config", type=Path, default=d.config_path, help="default: %(default)s")
    c.add_argument("--no-watch", action="store_true", help="do not watch the file for edits")
    c.add_argument("--force-polling", action="store_true",
                   help="watch by polling instead of inotify")
    c.add_argument("--clear-retained-on-remove", action="store_true",
                   help="clear a removed retained entry's message from the broker")
    c.add_argument("--max-config-bytes", type=int, default=d.max_config_bytes,
                   help="largest config file accepted (default: 16 MiB)")
    o = p.add_argument_group("operations")
    o.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    o.add_argument("--log-format", choices=("json", "console"), default="json",
                   help="stdout format (the log file is always JSON)")
    o.add_argument("--log-file", default="logs/mqtt_publisher.log",
                   help="rotated JSON log file; '' for none (default: %(default)s)")
    o.add_argument("--stats-interval", type=float, default=d.stats_interval,
                   help="seconds between publisher_statistics events (default: 60)")
    o.add_argument("--state-db", default=str(d.state_db),
                   help="SQLite file for counters across restarts; '' for none "
                        "(default: %(default)s)")
    o.add_argument("--checkpoint-interval", type=float, default=d.checkpoint_interval,
                   help="seconds between state checkpoints (default: 5)")
    o.add_argument("--history-retention", type=positive_int, default=d.history_retention_rows,
                   help="statistics history rows kept (default: 10000)")
    o.add_argument("--history-interval", type=float, default=d.history_interval,
                   help="seconds between statistics history rows (default: 60)")
    o.add_argument("--http-host", default=d.http_host, help="default: %(default)s")
    o.add_argument("--http-port", type=int, default=d.http_port,
                   help="health/status/metrics port; 0 turns HTTP off (default: 8080)")
    o.add_argument("--http-token-file", type=Path,
                   help="bearer token required for POST /reload")
    x = p.add_argument_group("quick start")
    x.add_argument("--embedded-broker", action="store_true",
                   help="start an in-process broker (amqtt, MQTT 3.1.1) and publish to it")
    x.add_argument("--echo", action="store_true", help="print every message on the broker")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """`run` is the default command: `scheduler-publisher --broker X` means `run --broker X`."""
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version")):
        args.insert(0, "run")
    return args


def read_password(args: argparse.Namespace, environ: dict[str, str]) -> str | None:
    """--password, then --password-file, then $MQTT_PASSWORD, then systemd credentials."""
    if args.password:
        return str(args.password)
    if args.password_file:
        return _first_line(args.password_file, "--password-file")
    if environ.get("MQTT_PASSWORD"):
        return environ["MQTT_PASSWORD"]
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / "mqtt-password").is_file():
        return _first_line(Path(creds) / "mqtt-password", "credential mqtt-password")
    return None


def _first_line(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise StartupError(f"{what} {path}: cannot read a password from it ({exc})") from None


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.cafile or args.certfile or args.tls_insecure):
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
    return ctx


def build_settings(args: argparse.Namespace, environ: dict[str, str]) -> ServiceSettings:
    password = read_password(args, environ)
    if password:
        register_secret(password)
    token = _first_line(args.http_token_file, "--http-token-file") if args.http_token_file \
        else None
    if token:
        register_secret(token)
    ctx = tls_context(args)
    protocol: MQTTVersion = "3.1.1" if args.embedded_broker else args.mqtt_version
    broker = BrokerSettings(
        host="127.0.0.1" if args.embedded_broker else args.broker,
        port=args.port or (8883 if ctx else 1883),
        client_id=args.client_id or default_client_id(args.config), username=args.username,
        password=password, protocol=protocol, keepalive=args.keepalive,
        backoff_min=args.backoff_min, backoff_max=args.backoff_max,
        max_retries=args.max_retries, will_delay=args.will_delay,
        status_topic=args.status_topic, connect_rate=args.connect_rate, tls_context=ctx,
        tls_insecure=args.tls_insecure)
    return ServiceSettings(
        config_path=args.config, broker=broker,
        logging=LogSettings(level=args.log_level, format=args.log_format,
                            file=Path(args.log_file) if args.log_file else None),
        stats_interval=args.stats_interval,
        state_db=Path(args.state_db) if args.state_db else None,
        checkpoint_interval=args.checkpoint_interval,
        history_interval=args.history_interval, history_retention_rows=args.history_retention,
        http_host=args.http_host, http_port=args.http_port, http_token=token,
        clear_retained_on_remove=args.clear_retained_on_remove, watch=not args.no_watch,
        force_polling=args.force_polling, max_config_bytes=args.max_config_bytes)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        result = ConfigurationLoader(args.config).load()
    except ConfigFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    for problem in result.problems:
        print(f"{problem.severity}: {problem}", file=sys.stderr)
    status = "invalid" if result.errors else "valid"
    print(f"{args.config}: {status}: {len(result.entries)} valid entries, "
          f"{len(result.errors)} errors, {len(result.warnings)} warnings")
    return EXIT_INVALID if result.errors else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # Until the service exists, remember SIGTERM/SIGINT/SIGHUP instead of dying of them (the
    # default action): a stop during start-up must still end with a clean shutdown and exit 0.
    early: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: early.add(signum))
    if args.tls_insecure:
        print("WARNING: --tls-insecure: the broker's certificate is NOT verified", file=sys.stderr)
    settings = build_settings(args, dict(os.environ))
    configure_logging(settings.logging)
    if args.tls_insecure:
        log.warning("tls_verification_disabled", hint="anyone on the path can impersonate the "
                    "broker and read the credentials")
    extras = _start_demo(args, settings)
    try:
        return _run_service(settings, early)
    finally:
        for part in reversed(extras):
            part.stop()


def _start_demo(args: argparse.Namespace,
                settings: ServiceSettings) -> list[EmbeddedBroker | EchoSubscriber]:
    parts: list[EmbeddedBroker | EchoSubscriber] = []
    if args.embedded_broker:
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
    print(f"echo {topic}{mark}: {payload.decode('utf-8', 'replace')}", flush=True)


def _run_service(settings: ServiceSettings, early: set[int]) -> int:
    from scheduler_publisher.service import PublisherService  # noqa: PLC0415 - after logging setup

    service = PublisherService(settings)

    # A handler runs on the main thread between two bytecodes, possibly while that thread holds
    # the mailbox lock or the wake Event's lock (the main loop is this thread): taking them
    # here could deadlock. Hand the request to a short-lived thread instead.
    def stop(_sig: int, _frame: FrameType | None) -> None:
        threading.Thread(target=service.request_stop, name="signal-stop", daemon=True).start()

    def reload(_sig: int, _frame: FrameType | None) -> None:
        threading.Thread(target=service.request_reload, name="signal-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    if early & {signal.SIGTERM, signal.SIGINT}:
        service.request_stop()
    elif signal.SIGHUP in early:
        service.request_reload()
    service.run()
    return EXIT_GAVE_UP if service.gave_up else EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(normalise_argv(sys.argv[1:] if argv is None else argv))
    try:
        code = cmd_validate(args) if args.command == "validate" else cmd_run(args)
    except ConfigFileError as exc:
        print(f"scheduler-publisher: cannot start: {exc}\n"
              f"Fix the file (check it with `scheduler-publisher validate --config "
              f"{args.config}`) and start again.", file=sys.stderr)
        code = EXIT_CONFIG
    except (StartupError, DemoError, StateStoreError) as exc:
        print(f"scheduler-publisher: cannot start: {exc}", file=sys.stderr)
        code = EXIT_STARTUP
    sys.exit(code)
