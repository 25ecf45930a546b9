from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import InProcessServices, Mosquitto, Subscriber, SubscriberFactory, unique_topic


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free loopback port, with its own config file."""
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[InProcessServices]:
    """In-process services, each stopped at teardown. Request it after the broker fixtures it
    uses, so that pytest stops the services before the brokers."""
    s = InProcessServices(tmp_path)
    yield s
    s.close()


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
