"""MQTTConnectionManager lifecycle without a broker round trip."""

from __future__ import annotations

import os

from scheduler_publisher import MQTTConnectionManager
from scheduler_publisher.settings import BrokerSettings
from tests.support import Mosquitto


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_constructor_opens_nothing_and_disconnect_before_connect_is_a_no_op() -> None:
    """No descriptor is held by a manager that never connects; disconnect() is safe anyway."""
    before = open_fds()
    manager = MQTTConnectionManager(BrokerSettings(host="127.0.0.1", port=1))
    assert open_fds() == before
    manager.disconnect(0.5)
    manager.disconnect(0.5)
    assert open_fds() == before


def test_connect_then_disconnect_twice_releases_every_descriptor(broker: Mosquitto) -> None:
    """After a graceful disconnect (even a repeated one) the loop's descriptors are closed."""
    before = open_fds()
    manager = MQTTConnectionManager(BrokerSettings(host="127.0.0.1", port=broker.port))
    assert manager.connect(wait=10)
    manager.disconnect(3)
    manager.disconnect(3)
    assert not manager.is_connected()
    assert open_fds() == before
