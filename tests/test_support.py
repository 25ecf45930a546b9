"""The test harness itself (tests/support.py): the CLI argument builder agrees with the real
parser, the HTTP client turns every status into a Reply, the benchmark can import it, and no
service a test starts reads the machine's options file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scheduler_publisher.cli.arguments import build_parser
from scheduler_publisher.cli.main import build_settings, main
from scheduler_publisher.settings import ServiceSettings
from tests.support import (
    OPTIONS_FILE_ENV,
    REPO,
    ServiceProcess,
    call,
    cli_args,
    free_port,
    request,
)


def settings_from(args: list[str]) -> ServiceSettings:
    return build_settings(build_parser().parse_args(args), {})


def test_cli_args_reach_the_settings_the_real_parser_builds(tmp_path: Path) -> None:
    """cli_args: loopback broker, the given port, config, files off, a unique client id, and
    `extra` last so that it overrides."""
    config = tmp_path / "c.json"
    one = settings_from(cli_args(1884, config, backoff=(0.2, 1), http_port=8099))
    two = settings_from(cli_args(1884, config))

    assert (one.broker.host, one.broker.port, one.config_path) == ("127.0.0.1", 1884, config)
    assert (one.http_port, one.state_db, one.logging.file) == (8099, None, None)
    assert (one.broker.backoff_min, one.broker.backoff_max) == (0.2, 1)
    assert one.broker.client_id != two.broker.client_id
    overridden = settings_from(cli_args(1884, config, "--http-port", "7000", client_id="exact"))
    assert (overridden.http_port, overridden.broker.client_id) == (7000, "exact")
    state = tmp_path / "s.db"
    assert settings_from(cli_args(1884, None, state_db=state)).state_db == state


class _Answers(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(503 if self.path == "/down" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.dumps({"auth": self.headers.get("Authorization"), "length": length}).encode()
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_the_http_client_returns_every_status_as_a_reply(http_port: int) -> None:
    """A 503 is a Reply like a 200, with its body, type and headers; POST sends an empty body
    and the bearer token."""
    down = call(http_port, "/down")
    assert (down.status, down.json(), down.content_type) == (
        503,
        {"path": "/down"},
        "application/json",
    )
    assert down.headers["Content-Length"] == str(len(down.body))
    assert call(http_port, "/up?x=1").json() == {"path": "/up?x=1"}
    posted = call(http_port, "/reload", "POST", token="t")
    assert posted.json() == {"auth": "Bearer t", "length": 0}
    sent = request(http_port, "POST", "/x", headers={"Authorization": "Basic a"}, body=b"abc")
    assert sent.json() == {"auth": "Basic a", "length": 3}


def test_the_benchmark_can_import_the_harness_without_pytest() -> None:
    """bench/run.py runs as a script from bench/: with the repository on sys.path it gets the
    broker, the launchers and free_port from tests.support, and pytest is not needed."""
    code = (
        "import sys; sys.modules['pytest'] = None; sys.path.insert(0, sys.argv[1]); "
        "from tests.support import Mosquitto, ServiceProcess, cli_args, free_port, call; "
        "print(free_port() > 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO)],
        cwd=REPO / "bench",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (out.returncode, out.stdout.strip()) == (0, "True"), out.stderr


def bogus_options_file(tmp_path: Path) -> Path:
    """What a gateway install would have in /etc: an options file this test run must not read
    (its unknown key makes any service that reads it exit 2)."""
    path = tmp_path / "etc-scheduler-publisher.toml"
    path.write_text('broker = "gateway.invalid"\nnot-an-option = 1\n')
    return path


def show_options(proc: ServiceProcess) -> list[str]:
    assert proc.wait(60) == 0, proc.stderr
    proc.stop()
    return proc.stdout


def test_a_launched_service_reads_no_options_file_unless_the_test_names_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine's options file, named by the caller's environment as a gateway's profile
    would, does not reach a ServiceProcess; one named by the test through `env` does."""
    bogus = bogus_options_file(tmp_path)
    monkeypatch.setenv(OPTIONS_FILE_ENV, str(bogus))
    monkeypatch.setenv("SCHEDULER_PUBLISHER_BROKER", "shell.invalid")
    args = cli_args(1884, None, command=("show-options",))

    plain = show_options(ServiceProcess(args, cwd=tmp_path))
    assert "# options file: none" in plain
    assert 'broker = "mqtt://127.0.0.1:1884"  # flag --broker' in plain
    assert not any("shell.invalid" in line for line in plain)

    named = tmp_path / "named.toml"
    named.write_text("keepalive = 45\n")
    chosen = show_options(ServiceProcess(args, cwd=tmp_path, env={OPTIONS_FILE_ENV: str(named)}))
    assert f"keepalive = 45  # file {named}" in chosen


def test_an_in_process_cli_run_reads_no_options_file_of_the_caller(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The session's environment is hermetic too: `main()` in-process and children started
    without ServiceProcess read no options file and no service variable of the caller."""
    assert os.environ.get(OPTIONS_FILE_ENV) == ""
    service_variables = [n for n in os.environ if n.startswith("SCHEDULER_PUBLISHER_")]
    assert service_variables == [OPTIONS_FILE_ENV]
    with pytest.raises(SystemExit) as exited:
        main(["show-options"])
    assert exited.value.code == 0
    assert "# options file: none" in capsys.readouterr().out.splitlines()
