"""The service's settings, built once by the CLI (or by a Python caller) and passed down whole."""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from scheduler_publisher.logs import LogSettings

MQTTVersion = Literal["5", "3.1.1"]
MetricsPerEntry = Literal["auto", "on", "off"]
MAX_CLIENT_ID_LENGTH = 64


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    host: str = "localhost"
    port: int = 1883
    client_id: str = field(default_factory=lambda: default_client_id())  # noqa: PLW0108 - defined below
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: MQTTVersion = "5"
    keepalive: int = 30
    connect_timeout: float = 5.0
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    max_retries: int | None = None  # None: retry forever
    will_delay: int = 0
    status_topic: str | None = None  # None: scheduler-publisher/<client-id>/status
    max_inflight: int = 100
    connect_rate: float = 200.0  # connection attempts per second, across all links
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    tls_insecure: bool = False

    @property
    def effective_status_topic(self) -> str:
        return self.status_topic or f"scheduler-publisher/{self.client_id}/status"

    def entry_client_id(self, entry_id: str) -> str:
        """Stable and unique per entry, derived from the service's id; hashed when too long."""
        plain = f"{self.client_id}/{entry_id}"
        if len(plain.encode("utf-8")) <= MAX_CLIENT_ID_LENGTH:
            return plain
        digest = hashlib.sha256(plain.encode("utf-8")).hexdigest()[:20]
        return f"{self.client_id[:MAX_CLIENT_ID_LENGTH - 22]}/~{digest}"


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    config_path: Path = Path("JSON/payloadStaticConfig.json")
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    logging: LogSettings = field(default_factory=LogSettings)
    stats_interval: float = 60.0
    state_db: Path | None = Path("logs/state.db")
    checkpoint_interval: float = 5.0
    history_interval: float = 60.0
    history_retention_rows: int = 10_000
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    http_token: str | None = field(default=None, repr=False)
    http_request_timeout: float = 10.0  # an idle or slow HTTP client is cut off after this
    metrics_per_entry: MetricsPerEntry = "auto"  # auto: per-entry series up to the limit
    metrics_entry_limit: int = 1000
    shutdown_timeout: float = 4.0
    reload_debounce: float = 0.3
    safety_check_interval: float = 60.0
    clear_retained_on_remove: bool = False
    watch: bool = True
    force_polling: bool = False
    max_config_bytes: int = 16 * 1024 * 1024


def default_client_id() -> str:
    """Stable across restarts and unique per host: the host name plus a digest of machine-id."""
    host = socket.gethostname() or "host"
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = host
    digest = hashlib.sha256(machine.encode()).hexdigest()[:8]
    return f"scheduler-publisher-{host[:24]}-{digest}"
