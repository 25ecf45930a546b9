"""Security end to end: TLS, mutual TLS, broker authentication, secrets in logs, the HTTP token
and hostile config files at start-up. Real Mosquitto, real service process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.support import (
    InProcessServices,
    Mosquitto,
    ServiceProcess,
    Subscriber,
    call,
    cli_args,
    entry,
    free_port,
    unique_topic,
    wait_until,
    write_config,
)

CERT_FAILURE = re.compile(r"certificate verification failed", re.IGNORECASE)
AUTH_FAILURE = re.compile(r"not authori[sz]ed|bad user ?name or password", re.IGNORECASE)


# ---- certificates -------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(pki: Path, name: str, cn: str, san: str | None) -> None:
    """An EC key and a certificate for `cn` (with `san`), signed by pki/ca.pem."""
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=pki,
    )
    ext = pki / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        ext.name,
        cwd=pki,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server cert for 127.0.0.1/localhost, one for another name, a client."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=scheduler-publisher test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    _issue(d, "server", "127.0.0.1", "IP:127.0.0.1,DNS:localhost")
    _issue(d, "wrongname", "broker.invalid", "DNS:broker.invalid")
    _issue(d, "client", "sp-client", None)
    return d


def tls_listener(pki: Path, server: str = "server", *, mutual: bool = False) -> str:
    extra = (
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / f'{server}.pem'}\n"
        f"keyfile {pki / f'{server}.key'}\n"
    )
    if mutual:
        extra += "require_certificate true\nuse_identity_as_username true\n"
    return extra


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Things with a stop() method, stopped at teardown in reverse order."""
    items: list[Any] = []
    yield items
    for item in reversed(items):
        item.stop()


def start_broker(tmp_path: Path, cleanup: list[Any], extra: str) -> Mosquitto:
    broker = Mosquitto(tmp_path, extra=extra)
    broker.start()
    cleanup.append(broker)
    return broker


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def plain_subscriber(broker_port: int, cleanup: list[Any], topic: str) -> Subscriber:
    wait_until(lambda: _accepts(broker_port), 15, message=f"listener on {broker_port}")
    sub = Subscriber(broker_port, [topic]).start()
    cleanup.append(sub)
    return sub


class Launcher:
    """Starts the real CLI against a port with a one-entry config; remembers what it started.
    Each process gets a log file of its own (one process writes a log file; a second one on
    it exits 6): `log_file` is the first one's."""

    def __init__(self, tmp_path: Path, cleanup: list[Any]) -> None:
        self.tmp_path = tmp_path
        self.cleanup = cleanup
        self.topic = unique_topic("sec")
        self.launched = 0

    def __call__(
        self, port: int, *extra: str, env: dict[str, str] | None = None, log_level: str = "INFO"
    ) -> ServiceProcess:
        config = self.tmp_path / "config.json"
        write_config(config, [entry("e1", self.topic, 0.5, qos=1)])
        log_file = self.log_file.with_stem(f"service-{self.launched}") if self.launched else None
        self.launched += 1
        args = cli_args(
            port,
            config,
            "--log-level",
            log_level,
            *extra,
            log_file=log_file or self.log_file,
            backoff=(0.5, 1),
        )
        proc = ServiceProcess(args, cwd=self.tmp_path, env=env)
        self.cleanup.append(proc)
        return proc

    @property
    def log_file(self) -> Path:
        return self.tmp_path / "service.log"


@pytest.fixture
def launch(tmp_path: Path, cleanup: list[Any]) -> Launcher:
    return Launcher(tmp_path, cleanup)


def failures(proc: ServiceProcess) -> list[dict[str, Any]]:
    return [e for e in proc.events() if e.get("message") == "mqtt_connect_failed"]


def wait_failures(proc: ServiceProcess, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        if proc.proc.poll() is not None:
            raise AssertionError(
                f"service exited ({proc.proc.returncode}):\n"
                + "\n".join(proc.stdout[-10:] + proc.stderr[-10:])
            )
        got = failures(proc)
        return got if len(got) >= count else None

    result: list[dict[str, Any]] = wait_until(
        enough, timeout, message=f"{count} mqtt_connect_failed events"
    )
    return result


def assert_retried_with_backoff(proc: ServiceProcess, pattern: re.Pattern[str]) -> None:
    """Failures are explained in words, retried (more than once), spaced out, and not fatal."""
    events = wait_failures(proc, 3, timeout=30)
    for e in events:
        assert pattern.search(str(e.get("reason"))), e
    assert all(e["retry_in_s"] > 0 for e in events[:3]), events[:3]
    assert proc.proc.poll() is None, "the service must keep retrying, not exit"
    assert not [e for e in proc.events() if e.get("message") == "mqtt_connected"]


# ---- TLS ----------------------------------------------------------------------------------


def test_tls_with_cafile_publishes(
    tmp_path: Path, cleanup: list[Any], pki: Path, launch: Launcher
) -> None:
    """--tls --cafile ca.pem: the server is verified and entries are published over TLS."""
    plain = free_port()  # the first listener is TLS; a plain one is for the test's subscriber
    broker = start_broker(tmp_path, cleanup, tls_listener(pki) + f"listener {plain} 127.0.0.1\n")
    sub = plain_subscriber(plain, cleanup, launch.topic)
    proc = launch(broker.port, "--tls", "--cafile", str(pki / "ca.pem"))
    proc.wait_for_event("mqtt_connected", timeout=30)
    got = sub.wait_for(launch.topic, timeout=20)
    assert got[0].json() == {"online": 1, "sensor": "e1"}
    assert not failures(proc)


def test_tls_without_cafile_fails_verification_and_retries(
    tmp_path: Path, cleanup: list[Any], pki: Path, launch: Launcher
) -> None:
    """System CAs do not know the test CA: logged as a certificate failure, retried, alive."""
    broker = start_broker(tmp_path, cleanup, tls_listener(pki))
    proc = launch(broker.port, "--tls")
    assert_retried_with_backoff(proc, CERT_FAILURE)


def test_tls_hostname_mismatch_fails_verification_and_retries(
    tmp_path: Path, cleanup: list[Any], pki: Path, launch: Launcher
) -> None:
    """A certificate for another host name is rejected in words and retried with backoff."""
    broker = start_broker(tmp_path, cleanup, tls_listener(pki, "wrongname"))
    proc = launch(broker.port, "--tls", "--cafile", str(pki / "ca.pem"))
    assert_retried_with_backoff(proc, CERT_FAILURE)
    assert (
        "127.0.0.1" in str(failures(proc)[0]["reason"])
        or "mismatch" in str(failures(proc)[0]["reason"]).lower()
    )


def test_tls_insecure_connects_and_warns_loudly(
    tmp_path: Path, cleanup: list[Any], pki: Path, launch: Launcher
) -> None:
    """--tls-insecure connects to an unverifiable broker and says so on stderr and in the log."""
    plain = free_port()
    broker = start_broker(
        tmp_path, cleanup, tls_listener(pki, "wrongname") + f"listener {plain} 127.0.0.1\n"
    )
    sub = plain_subscriber(plain, cleanup, launch.topic)
    proc = launch(broker.port, "--tls", "--tls-insecure")
    warning = proc.wait_for_event("tls_verification_disabled", timeout=20)
    assert warning["log.level"] == "warning"
    proc.wait_for_event("mqtt_connected", timeout=30)
    sub.wait_for(launch.topic, timeout=20)
    assert any("NOT verified" in line for line in proc.stderr)


def test_mutual_tls_with_client_certificate(
    tmp_path: Path, cleanup: list[Any], pki: Path, launch: Launcher
) -> None:
    """require_certificate: --certfile/--keyfile connects and publishes; without them it fails."""
    plain = free_port()
    broker = start_broker(
        tmp_path, cleanup, tls_listener(pki, mutual=True) + f"listener {plain} 127.0.0.1\n"
    )
    sub = plain_subscriber(plain, cleanup, launch.topic)
    proc = launch(
        broker.port,
        "--tls",
        "--cafile",
        str(pki / "ca.pem"),
        "--certfile",
        str(pki / "client.pem"),
        "--keyfile",
        str(pki / "client.key"),
    )
    proc.wait_for_event("mqtt_connected", timeout=30)
    sub.wait_for(launch.topic, timeout=20)

    without = launch(broker.port, "--tls", "--cafile", str(pki / "ca.pem"))
    events = wait_failures(without, 2, timeout=30)
    assert without.proc.poll() is None
    assert not [e for e in without.events() if e.get("message") == "mqtt_connected"]
    assert all(e.get("reason") for e in events)


# ---- authentication and secrets -----------------------------------------------------------


SUB_USER, SUB_PASSWORD = "observer", "observer-password"


def password_broker(tmp_path: Path, cleanup: list[Any], user: str, password: str) -> Mosquitto:
    """A broker that only lets in `user` (and the test's observer) with a password."""
    pwfile = tmp_path / "mosquitto.passwd"
    for i, (u, p) in enumerate(((user, password), (SUB_USER, SUB_PASSWORD))):
        subprocess.run(
            ["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(pwfile), u, p],
            check=True,
            capture_output=True,
            timeout=30,
        )
    # The later allow_anonymous wins over the fixture's `allow_anonymous true`.
    return start_broker(tmp_path, cleanup, f"allow_anonymous false\npassword_file {pwfile}\n")


def authed_subscriber(broker: Mosquitto, cleanup: list[Any], topic: str) -> Subscriber:
    sub = Subscriber(broker.port, [topic])
    sub.client.username_pw_set(SUB_USER, SUB_PASSWORD)
    sub.start()
    cleanup.append(sub)
    return sub


def assert_never_logged(proc: ServiceProcess, log_file: Path, secret: str) -> None:
    proc.stop()
    everything = "\n".join(proc.stdout + proc.stderr)
    assert everything, "the service logged nothing at all"
    assert secret not in everything
    assert log_file.exists()
    assert secret not in log_file.read_text(errors="replace")


def test_wrong_password_is_refused_in_words_and_retried_with_bounded_rate(
    tmp_path: Path, cleanup: list[Any], launch: Launcher
) -> None:
    """A wrong password: "not authorized" in words, retried with backoff (no hot loop), and the
    wrong password never shows up in stdout, stderr or the log file at DEBUG."""
    good, wrong = f"right-{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"
    broker = password_broker(tmp_path, cleanup, "gw", good)
    pwfile = tmp_path / "pw"
    pwfile.write_text(wrong + "\n")
    proc = launch(
        broker.port, "--username", "gw", "--password-file", str(pwfile), log_level="DEBUG"
    )
    first = wait_failures(proc, 1, timeout=30)[0]
    assert AUTH_FAILURE.search(str(first["reason"])), first
    # Observe 6 s of the service's own log clock. With backoff 0.5..1 s there are at most ~13
    # attempts, one event each; a hot loop would log hundreds.
    wait_until(
        lambda: any(ts(e) - ts(first) >= 6.0 for e in failures(proc)),
        40,
        message="a failure logged 6 s after the first",
    )
    in_window = [e for e in failures(proc) if ts(e) - ts(first) < 6.0]
    assert 3 <= len(in_window) <= 16, len(in_window)
    assert all(AUTH_FAILURE.search(str(e["reason"])) for e in in_window), in_window
    assert proc.proc.poll() is None
    assert not [e for e in proc.events() if e.get("message") == "mqtt_connected"]
    assert_never_logged(proc, launch.log_file, wrong)


def ts(e: dict[str, Any]) -> float:
    """An event's @timestamp as a unix time."""
    return datetime.fromisoformat(str(e["@timestamp"]).replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("source", ["password-file", "env", "credentials-directory"])
def test_password_sources_connect_and_never_log_the_password(
    tmp_path: Path, cleanup: list[Any], launch: Launcher, source: str
) -> None:
    """--password-file, $MQTT_PASSWORD and $CREDENTIALS_DIRECTORY/mqtt-password each connect,
    and the password is not in stdout, stderr or the log file at DEBUG."""
    password = f"pw-{uuid.uuid4().hex}"
    broker = password_broker(tmp_path, cleanup, "gw", password)
    sub = authed_subscriber(broker, cleanup, launch.topic)
    extra: list[str] = ["--username", "gw"]
    env: dict[str, str] = {"MQTT_PASSWORD": "", "CREDENTIALS_DIRECTORY": ""}
    if source == "password-file":
        (tmp_path / "pw").write_text(password + "\n")
        extra += ["--password-file", str(tmp_path / "pw")]
    elif source == "env":
        env["MQTT_PASSWORD"] = password
    else:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "mqtt-password").write_text(password)
        env["CREDENTIALS_DIRECTORY"] = str(creds)
    proc = launch(broker.port, *extra, env=env, log_level="DEBUG")
    proc.wait_for_event("mqtt_connected", timeout=30)
    sub.wait_for(launch.topic, timeout=20)
    assert not failures(proc)
    assert_never_logged(proc, launch.log_file, password)


# ---- HTTP token ---------------------------------------------------------------------------


def _post(port: int, token: str | None) -> tuple[int, dict[str, Any]]:
    reply = call(port, "/reload", "POST", token=token, timeout=15)
    return reply.status, json.loads(reply.body or b"{}")


def test_http_reload_requires_the_bearer_token(
    tmp_path: Path, cleanup: list[Any], launch: Launcher
) -> None:
    """POST /reload with --http-token-file: 401 without or with a wrong token, 200 with it; the
    token is never logged."""
    broker = start_broker(tmp_path, cleanup, "")
    token = f"tok-{uuid.uuid4().hex}"
    (tmp_path / "token").write_text(token + "\n")
    port = free_port()
    proc = launch(
        broker.port,
        "--http-port",
        str(port),
        "--http-token-file",
        str(tmp_path / "token"),
        log_level="DEBUG",
    )
    proc.wait_for_event("http_listening", timeout=30)
    assert _post(port, None)[0] == 401
    assert _post(port, "not-" + token)[0] == 401
    code, body = _post(port, token)
    assert code == 200
    assert body["success"] is True
    assert body["active_configs"] == 1
    assert_never_logged(proc, launch.log_file, token)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty; write the HTTP bearer token on the first line"),
        (b"\n", "the file is empty"),
        (b"   \t\n", "the file is empty"),
        (b"\nreal-token-on-line-2\n", "its first line is empty"),
        (b"  \nreal-token-on-line-2\n", "its first line is empty"),
        ("t\u00f6ken\n".encode(), "the token must be printable ASCII characters"),
        (b"tok\x01en\n", "the token must be printable ASCII characters"),
        (b"\xff\xfe\n", "cannot read the HTTP bearer token"),
        (b"x" * 70_000, "over 65536 bytes"),
    ],
)
def test_a_token_file_without_a_usable_token_stops_the_start(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    """A token file whose first line has no token (empty file, blank first line, blanks)
    or a token a header cannot carry exits 5 with one line naming the file and the token;
    never an empty token that `Authorization: Bearer` would match."""
    config = tmp_path / "config.json"
    write_config(config, [entry("one", f"{unique_topic()}/one", 1)])
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    code, err = _run_to_exit(tmp_path, config, "--http-token-file", str(token_file))
    assert code == 5
    (line,) = [line for line in err.splitlines() if "cannot start" in line]
    assert f"--http-token-file {token_file}: {expected}" in line
    assert "password" not in line
    assert "index" not in line


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_token_file_that_is_no_regular_file_stops_the_start(tmp_path: Path, kind: str) -> None:
    """A FIFO (which would hang the start), a folder or /dev/zero (which never ends) as the
    token file exits 5 at once, saying so."""
    config = tmp_path / "config.json"
    write_config(config, [entry("one", f"{unique_topic()}/one", 1)])
    path = tmp_path / "token"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path("/dev/zero")
    code, err = _run_to_exit(tmp_path, config, "--http-token-file", str(path))
    assert code == 5
    assert f"--http-token-file {path}: not a regular file" in err


# ---- config files that cannot be used at start-up ------------------------------------------


def _run_to_exit(tmp_path: Path, config: Path, *extra: str) -> tuple[int, str]:
    args = cli_args(free_port(), config, *extra)
    proc = ServiceProcess(args, cwd=tmp_path)
    try:
        code = proc.wait(60)
    finally:
        proc.stop()
    return code, "\n".join(proc.stderr)


def test_config_above_max_bytes_at_start_exits_3(tmp_path: Path) -> None:
    """A config file larger than --max-config-bytes stops the start with exit 3 and says why."""
    config = tmp_path / "big.json"
    entries = [entry(f"e{i}", f"{unique_topic()}/{i}", 1) for i in range(200)]
    write_config(config, entries)
    limit = config.stat().st_size - 1
    code, err = _run_to_exit(tmp_path, config, "--max-config-bytes", str(limit))
    assert code == 3
    assert "cannot start" in err
    assert f"{limit}-byte limit" in err


# 100 levels is no longer a file error: the element is one invalid entry and the rest of the
# file is read (issue 11 #19; tests/test_config.py::test_nesting_limit_is_64_levels).
@pytest.mark.parametrize("depth", [100_000])
def test_deeply_nested_config_at_start_exits_3(tmp_path: Path, depth: int) -> None:
    """A recursion bomb, nested too deep to find where its element ends, is refused with
    exit 3."""
    config = tmp_path / "deep.json"
    config.write_text("[" * depth + "]" * depth)
    code, err = _run_to_exit(tmp_path, config)
    assert code == 3, err
    assert "cannot start" in err
    assert "deep" in err.lower() or "nest" in err.lower()
    assert "Traceback" not in err


# ---- a config file anyone can write -------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_mode", "folder_mode", "expected"),
    [
        (0o644, 0o755, []),
        (0o666, 0o755, ["config.json is world-writable"]),
        (0o644, 0o777, ["folder", "is world-writable"]),
        (0o644, 0o1777, ["folder", "is world-writable (sticky)"]),
    ],
)
def test_world_writable_config_is_warned_about_at_start(
    tmp_path: Path,
    broker: Mosquitto,
    services: InProcessServices,
    topic_base: str,
    file_mode: int,
    folder_mode: int,
    expected: list[str],
) -> None:
    """A config file, or its folder, that anyone may write is named in a warning at start."""
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "config.json"
    write_config(config, [entry("a", f"{topic_base}/a", 3600)])
    config.chmod(file_mode)
    folder.chmod(folder_mode)
    service = services.create(broker.port, config=config, watch=False)
    with capture_logs() as logs:
        service.start()
        service.stop()
    warned = [e["problem"] for e in logs if e["event"] == "config_file_insecure"]
    if not expected:
        assert warned == []
    else:
        assert len(warned) == 1
        assert all(part in warned[0] for part in expected), warned
