"""Broker endpoints: the grammar of `--broker` (endpoints.py) and how the CLI checks it against
`--port` and the TLS options, from a flag, the environment or the options file. In-process CLI;
the wire is tested in test_transports.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from scheduler_publisher.cli import arguments, options
from scheduler_publisher.cli import main as cli
from scheduler_publisher.cli.main import main
from scheduler_publisher.endpoints import Endpoint, EndpointError, endpoint_of, parse_list
from scheduler_publisher.settings import BrokerSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No option variable from the caller's shell, and no /etc options file, leaks in."""
    for name in list(os.environ):
        if name.startswith("SCHEDULER_PUBLISHER_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(options, "DEFAULT_OPTIONS_FILE", tmp_path / "absent" / "default.toml")


@pytest.fixture(autouse=True)
def never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` must not start: every run here is expected to exit 2 first."""

    def refuse(_args: argparse.Namespace) -> int:
        raise AssertionError("the service was started; the options should have been refused")

    monkeypatch.setitem(cli.COMMAND_HANDLERS, "run", refuse)


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    return code if isinstance(code, int) else 0


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Runs argv, expects exit 2 and one line on stderr; returns that line."""
    assert run_main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def shown_broker(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The `broker = ...` line of show-options."""
    assert run_main(["show-options", "--options-file", "", *argv]) == 0, capsys.readouterr().err
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("broker =")]
    assert len(lines) == 1, lines
    return lines[0]


# ---- the grammar ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "url", "tls", "transport"),
    [
        ("broker.lan", "mqtt://broker.lan:1883", False, "tcp"),
        ("broker.lan:1884", "mqtt://broker.lan:1884", False, "tcp"),
        ("[::1]:8883", "mqtt://[::1]:8883", False, "tcp"),
        ("::1", "mqtt://[::1]:1883", False, "tcp"),
        ("mqtt://10.0.0.7", "mqtt://10.0.0.7:1883", False, "tcp"),
        ("MQTTS://broker.lan", "mqtts://broker.lan:8883", True, "tcp"),
        ("mqtts://[fe80::1%eth0]:18883", "mqtts://[fe80::1%eth0]:18883", True, "tcp"),
        ("mqtt://broker.lan/", "mqtt://broker.lan:1883", False, "tcp"),
        ("ws://broker.lan", "ws://broker.lan:80/mqtt", False, "websockets"),
        ("ws://broker.lan:9001/", "ws://broker.lan:9001/", False, "websockets"),
        ("wss://broker.lan", "wss://broker.lan:443/mqtt", True, "websockets"),
        ("wss://broker.lan:8443/a/b%20c", "wss://broker.lan:8443/a/b%20c", True, "websockets"),
    ],
)
def test_a_broker_text_becomes_one_endpoint_with_its_defaults(
    text: str, url: str, tls: bool, transport: str
) -> None:
    """Hosts, host:port, IPv6 and the four schemes, with default ports and the /mqtt path."""
    endpoint = endpoint_of(text)
    assert (endpoint.url, endpoint.tls, endpoint.transport) == (url, tls, transport)


def test_port_and_tls_fill_only_what_a_bare_host_leaves_open() -> None:
    """--port and --tls choose for a bare host; a URL's own port and scheme stay."""
    assert endpoint_of("h", port=1999, tls=True) == Endpoint("mqtts", "h", 1999)
    assert endpoint_of("h", tls=True).port == 8883
    assert endpoint_of("ws://h", port=8080).url == "ws://h:8080/mqtt"
    assert endpoint_of("mqtts://h:9999", port=9999, tls=True).url == "mqtts://h:9999"


def test_a_list_keeps_its_order_and_ignores_blanks_around_commas() -> None:
    """`a, ws://b` is two brokers, in order."""
    given = parse_list(" a , ws://b:9001/x ")
    assert [g.endpoint(None, False).url for g in given] == ["mqtt://a:1883", "ws://b:9001/x"]


BAD = [
    ("gopher://broker.lan", "unknown scheme 'gopher'"),
    ("tcp://broker.lan:1883", "unknown scheme 'tcp'"),
    ("mqtt://user:s3cret@broker.lan", "credentials"),
    ("mqtt://user@broker.lan", "credentials"),
    ("wss://user:pa/ss@broker.lan/mqtt", "credentials"),
    ("mqtt://broker.lan:0", "invalid port '0'"),
    ("mqtt://broker.lan:65536", "invalid port '65536'"),
    ("broker.lan:http", "invalid port 'http'"),
    ("mqtt://broker.lan:", "invalid port ''"),
    ("mqtt://", "no host"),
    ("mqtt://:1883", "no host"),
    ("ws:///mqtt", "no host"),
    ("mqtt://broker.lan?x=1", "query or fragment"),
    ("ws://broker.lan/mqtt#top", "query or fragment"),
    ("mqtt://broker.lan/mqtt", "only ws:// and wss://"),
    ("mqtts://broker.lan/x", "only ws:// and wss://"),
    ("ws://broker.lan/a b", "without spaces"),
    ("broker lan", "without spaces"),
    ("", "must name a broker"),
    ("a,,b", "empty item"),
    ("[::1", "IPv6"),
    ("[not-v6]:1883", "IPv6"),
    ("[::1]x", ":port after ]"),
    ("fe80::1:1883x", "IPv6 address in [ ]"),
    ("bro/ker", "invalid host"),
    ("ws://h/ü", "characters to escape"),
]


@pytest.mark.parametrize(("text", "complaint"), BAD)
def test_a_bad_broker_text_is_refused_saying_what_was_received(text: str, complaint: str) -> None:
    """Each malformed broker is an EndpointError naming the problem and the text received."""
    with pytest.raises(EndpointError) as refused:
        parse_list(text)
    assert complaint in str(refused.value)
    assert "got " in str(refused.value)


def test_a_refused_url_never_shows_the_password() -> None:
    """The message about credentials shows the user name and hides the password."""
    with pytest.raises(EndpointError) as refused:
        parse_list("wss://admin:pa/ss?w#rd@broker.lan/mqtt")
    assert "pa/ss" not in str(refused.value)
    assert "admin:<redacted>@broker.lan" in str(refused.value)


# ---- the CLI: where the value came from, and --port/--tls against it -------------------------


@pytest.mark.parametrize(("text", "complaint"), BAD[:10])
def test_a_bad_broker_flag_exits_2_naming_the_flag_and_value(
    capsys: pytest.CaptureFixture[str], text: str, complaint: str
) -> None:
    """`--broker gopher://x` exits 2 with one line naming --broker, the problem and the value."""
    line = usage_error(capsys, ["run", "--options-file", "", "--broker", text])
    assert "--broker" in line
    assert complaint in line
    assert "s3cret" not in line


def test_a_bad_broker_variable_exits_2_naming_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SCHEDULER_PUBLISHER_BROKER=gopher://x exits 2 naming the variable and the value."""
    monkeypatch.setenv("SCHEDULER_PUBLISHER_BROKER", "gopher://x")
    line = usage_error(capsys, ["run", "--options-file", ""])
    assert "SCHEDULER_PUBLISHER_BROKER" in line
    assert "'gopher://x'" in line


def test_a_bad_broker_in_the_options_file_exits_2_naming_the_file_and_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`broker = "mqtt://u:pw@h"` in the file exits 2 naming the file and key, no password."""
    opts = tmp_path / "o.toml"
    opts.write_text('broker = "mqtt://u:hunter2@h"\n')
    line = usage_error(capsys, ["run", "--options-file", str(opts)])
    assert f"options file {opts}: broker" in line
    assert "credentials" in line
    assert "hunter2" not in line


@pytest.mark.parametrize(
    ("argv", "env", "complaint"),
    [
        (["--broker", "mqtt://h:1884", "--port", "1885"], {}, "says port 1884, but port"),
        (["--broker", "ws://h:9001"], {"PORT": "9002"}, "SCHEDULER_PUBLISHER_PORT) is 9002"),
        (["--broker", "mqtt://h", "--tls"], {}, "mqtt:// without TLS, but tls (flag --tls)"),
        (["--broker", "ws://h", "--cafile", "ca.pem"], {}, "no broker uses TLS"),
        (["--broker", "mqtt://h,ws://i", "--tls-insecure"], {}, "no broker uses TLS"),
        (["--broker", "mqtt://h", "--tls-alpn", "mqtt"], {}, "no broker uses TLS"),
        (["--broker", "mqtts://h"], {"TLS": "false"}, "(TLS), but tls (env"),
        (["--broker", "a,wss://b"], {"TLS": "no"}, "'wss://b' is wss:// (TLS)"),
    ],
)
def test_port_or_tls_that_contradict_a_url_exit_2_naming_both(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    complaint: str,
) -> None:
    """A URL with a port and another --port, mqtt:// with a TLS option, mqtts:// with tls =
    false: exit 2, not a silent choice; the line names the broker and the other option."""
    for name, value in env.items():
        monkeypatch.setenv(f"SCHEDULER_PUBLISHER_{name}", value)
    line = usage_error(capsys, ["run", "--options-file", "", *argv])
    assert "broker (flag --broker)" in line
    assert complaint in line
    if "no broker uses TLS" in complaint:
        assert f"{argv[2][2:]} (flag {argv[2]})" in line  # names the TLS option too


def test_port_and_tls_keep_working_for_a_bare_host(capsys: pytest.CaptureFixture[str]) -> None:
    """--broker h --port 1999 --tls connects to mqtts://h:1999; a URL's equal port is fine."""
    assert shown_broker(capsys, "--broker", "h", "--port", "1999", "--tls") == (
        'broker = "mqtts://h:1999"  # flag --broker'
    )
    assert shown_broker(capsys, "--broker", "ws://h:1999", "--port", "1999").startswith(
        'broker = "ws://h:1999/mqtt"'
    )


def test_show_options_prints_the_url_and_the_file_may_give_an_array(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """show-options shows the URL the service connects to; `broker = [..]` is a TOML array."""
    assert shown_broker(capsys, "--broker", "wss://gw.example") == (
        'broker = "wss://gw.example:443/mqtt"  # flag --broker'
    )
    opts = tmp_path / "o.toml"
    opts.write_text('broker = ["mqtts://a", "ws://b:9001/x"]\ntls-alpn = ["x-amzn-mqtt-ca"]\n')
    line = shown_broker(capsys, "--options-file", str(opts))
    assert line.startswith('broker = "mqtts://a:8883,ws://b:9001/x"  # file')


@pytest.mark.parametrize("alpn", ["", "a b", "a,,b", "x" * 256])
def test_a_bad_alpn_list_exits_2(capsys: pytest.CaptureFixture[str], alpn: str) -> None:
    """--tls-alpn takes printable protocol names, 1 to 255 characters, separated by commas."""
    line = usage_error(capsys, ["run", "--options-file", "", "--tls", "--tls-alpn", alpn])
    assert "--tls-alpn" in line
    assert "ALPN protocol names" in line


def test_settings_built_by_the_cli_carry_every_endpoint_and_alpn(tmp_path: Path) -> None:
    """build_settings: the endpoints in order, one TLS context with the ALPN protocols set."""
    parser = arguments.build_parser()
    argv = ["run", "--options-file", "", "--broker", "mqtts://a:8883,ws://b", "--tls-alpn", "p1,p2"]
    args = parser.parse_args(argv)
    args.origins = arguments.apply_options(parser, argv, args, {})
    settings = cli.build_settings(args, {})
    assert [e.url for e in settings.broker.brokers] == ["mqtts://a:8883", "ws://b:80/mqtt"]
    assert settings.broker.tls_context is not None
    assert (settings.broker.host, settings.broker.port) == ("a", 8883)


def test_python_callers_keep_host_and_port() -> None:
    """BrokerSettings(host, port) without endpoints is the one plain (or TLS) broker."""
    assert BrokerSettings(host="h", port=1999).brokers == (Endpoint("mqtt", "h", 1999),)


def test_a_broker_listed_twice_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`a,mqtt://a:1883` is one broker twice: a failover list names each broker once."""
    line = usage_error(capsys, ["run", "--options-file", "", "--broker", "a,b,mqtt://a:1883"])
    assert "broker (flag --broker) names mqtt://a:1883 twice" in line
