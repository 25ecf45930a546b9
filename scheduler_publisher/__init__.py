"""scheduler-publisher: publishes static JSON payloads to MQTT topics on a schedule.

The public classes are imported on first use (PEP 562 module `__getattr__`), so that
`import scheduler_publisher`, `--version` and `validate` do not load paho, APScheduler and
watchdog, and so that the version is readable without the dependencies installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler_publisher.config.loader import ConfigurationLoader, PublishConfig
    from scheduler_publisher.mqtt.connection import MQTTConnectionManager
    from scheduler_publisher.service import PublisherService

# The one place the version is defined: setup.cfg reads it with `attr:`.
__version__ = "0.1.0"
__all__ = ["ConfigurationLoader", "MQTTConnectionManager", "PublishConfig", "PublisherService"]

_HOMES = {
    "ConfigurationLoader": "config.loader",
    "PublishConfig": "config.loader",
    "MQTTConnectionManager": "mqtt.connection",
    "PublisherService": "service",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'scheduler_publisher' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"scheduler_publisher.{_HOMES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
