"""The test harness itself (tests/support.py): the CLI argument builder agrees with the real
parser, the HTTP client turns every status into a Reply, and the benchmark can import it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scheduler_publisher.cli.arguments import build_parser
from scheduler_publisher.cli.main import build_settings
from scheduler_publisher.settings import ServiceSettings
from tests.support import REPO, call, cli_args, free_port, request


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
