"""scheduler-publisher: publishes static JSON payloads to MQTT topics on a schedule."""

__version__ = "0.1.0"
