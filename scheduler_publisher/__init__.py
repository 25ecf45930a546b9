"""scheduler-publisher: publishes static JSON payloads to MQTT topics on a schedule."""

from scheduler_publisher.config import ConfigurationLoader, PublishConfig
from scheduler_publisher.connection import MQTTConnectionManager
from scheduler_publisher.service import PublisherService

__version__ = "0.1.0"
__all__ = ["ConfigurationLoader", "MQTTConnectionManager", "PublishConfig", "PublisherService"]
