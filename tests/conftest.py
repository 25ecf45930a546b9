from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.netproxy import NetProxy
from tests.support import (
    InProcessServices,
    Mosquitto,
    ServiceProcess,
    ServiceStarter,
    Subscriber,
    SubscriberFactory,
    free_port,
    hermetic_environ,
    session_free_loop,
    unique_topic,
)

if TYPE_CHECKING:
    from scheduler_publisher.mqtt.netloop import NetworkLoop
    from scheduler_publisher.service import PublisherService


@pytest.fixture(autouse=True, scope="session")
def hermetic_environment() -> Iterator[None]:
    """No test reads the machine's options file or the service variables of the caller's shell:
    not `main()` in-process, nor a child process started without ServiceProcess (which makes
    its own environment hermetic too). A test names a file or sets a variable itself."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(hermetic_environ(saved))
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free loopback port, with its own config file."""
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def loop() -> Iterator[NetworkLoop]:
    """A running network loop without sessions, for a Schedule to run on."""
    running = session_free_loop()
    yield running
    running.stop(5)


@pytest.fixture
def proxy(broker: Mosquitto) -> Iterator[NetProxy]:
    """A TCP proxy in front of `broker` that a test can black-hole, cut or slow down."""
    p = NetProxy(broker.port).start()
    yield p
    p.stop()


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    """Real service processes started by the test; stopped at teardown, their last output
    printed (pytest shows it only for a failed test)."""
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.stop()
        print(*proc.stdout[-30:], *proc.stderr[-20:], sep="\n")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[InProcessServices]:
    """In-process services, each stopped at teardown. Request it after the broker fixtures it
    uses, so that pytest stops the services before the brokers."""
    s = InProcessServices(tmp_path)
    yield s
    s.close()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The entries file of the service `http_service` starts."""
    return tmp_path / "config.json"


@pytest.fixture
def http_service(config_path: Path, broker: Mosquitto) -> Iterator[ServiceStarter]:
    """Starts in-process services on `config_path` with HTTP on a free loopback port; stopped
    at teardown (the HTTP, metrics and status-page tests)."""
    services = InProcessServices(config_path.parent)

    def start(entries: list[dict[str, Any]], **overrides: Any) -> PublisherService:
        overrides.setdefault("http_port", free_port())
        return services.start(
            broker.port, entries, config=config_path, http_host="127.0.0.1", **overrides
        )

    yield start
    services.close()


@pytest.fixture
def topic_base(request: pytest.FixtureRequest) -> str:
    """A topic prefix no other test uses."""
    return unique_topic(request.node.name[:40])


@pytest.fixture
def subscriber_factory(broker: Mosquitto) -> Iterator[SubscriberFactory]:
    subs: list[Subscriber] = []

    def make(*topics: str, qos: int = 2) -> Subscriber:
        s = Subscriber(broker.port, list(topics), qos).start()
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.stop()
