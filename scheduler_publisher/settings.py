"""The service's settings, built once by the CLI (or by a Python caller) and passed down whole."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from scheduler_publisher.config.rules import FIELDS_BY_NAME
from scheduler_publisher.config.shard import Shard
from scheduler_publisher.endpoints import Endpoint
from scheduler_publisher.logs.setup import LogSettings
from scheduler_publisher.mailbox import Debounce

MQTTVersion = Literal["5", "3.1.1"]
MetricsPerEntry = Literal["auto", "on", "off"]
MAX_CLIENT_ID_LENGTH = 64  # of an lwt entry's derived client id (entry_client_id)
# An MQTT UTF-8 string (a client id, a topic) carries its length in two bytes.
MQTT_STRING_BYTES = 65535
_STATUS_TOPIC = "scheduler-publisher/{}/status"
DEFAULT_STATE_DB = Path("logs/state.db")
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:@/-][A-Za-z0-9_.:@/~-]*")


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
    # The brokers, in failover order; () means the one at host:port (TLS if tls_context).
    # A TLS endpoint uses tls_context (a default one if None); a plain one ignores it.
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def brokers(self) -> tuple[Endpoint, ...]:
        if self.endpoints:
            return self.endpoints
        return (Endpoint("mqtts" if self.tls_context else "mqtt", self.host, self.port),)

    @property
    def effective_status_topic(self) -> str:
        return self.status_topic or _STATUS_TOPIC.format(self.client_id)

    def for_shard(self, shard: Shard) -> BrokerSettings:
        """The names of shard `shard`: its client id gets the `-K-of-N` suffix, and so does an
        explicit status topic (the default one follows the client id)."""
        topic = shard.status_topic(self.status_topic) if self.status_topic else None
        return replace(self, client_id=shard.client_id(self.client_id), status_topic=topic)

    def entry_client_id(self, entry_id: str) -> str:
        """Stable and unique per entry, derived from the service's id, and always one a broker
        accepts: `<client-id>/<entry id>` when the id is short and plain (letters, digits and
        `-_.:@/`), otherwise `<client-id, cut to 42 bytes>/~<digest of both ids>`. The two
        forms cannot meet, as a plain id never starts with `~`, and neither can equal the main
        connection's id."""
        if _PLAIN_ID.fullmatch(entry_id):
            plain = f"{self.client_id}/{entry_id}"
            if len(plain.encode("utf-8")) <= MAX_CLIENT_ID_LENGTH:
                return plain
        # NUL, control characters, spaces or wildcards would make a broker refuse the CONNECT
        # (issue 11 #14); a long id would exceed what some brokers take. The prefix is cut, so
        # the digest covers the whole client id too: two services whose ids differ only past
        # the cut (the default id's config-file digest comes last) must not share a connection.
        named = f"{self.client_id}\0{entry_id}".encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(named).hexdigest()[:20]
        prefix = self.client_id.encode("utf-8")[: MAX_CLIENT_ID_LENGTH - 22]
        return f"{prefix.decode('utf-8', 'ignore')}/~{digest}"


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    config_path: Path = Path("JSON/payloadStaticConfig.json")
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    logging: LogSettings = field(default_factory=LogSettings)
    stats_interval: float = 60.0
    state_db: Path | None = DEFAULT_STATE_DB
    # A shard's own state_db, derived from the default (shard_path), starts as a copy of this
    # file, which a release without per-shard defaults wrote (docs/scaling.md); None: empty.
    state_db_predecessor: Path | None = None
    checkpoint_interval: float = 5.0
    history_interval: float = 60.0
    history_retention_rows: int = 10_000
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    http_token: str | None = field(default=None, repr=False)
    # `Host:` names HTTP answers besides localhost and --http-host (ops/http.py HostCheck)
    http_allowed_hosts: tuple[str, ...] = ()
    # An HTTP request not complete this long after its connection is cut off, and a reply not
    # taken this long after it was ready (ops/http_server.py).
    http_request_timeout: float = 10.0
    metrics_per_entry: MetricsPerEntry = "auto"  # auto: per-entry series up to the limit
    metrics_entry_limit: int = 1000
    shutdown_timeout: float = 4.0
    reload_debounce: Debounce = field(default_factory=Debounce)
    safety_check_interval: float = 60.0
    clear_retained_on_remove: bool = False
    watch: bool = True
    force_polling: bool = False
    max_config_bytes: int = 16 * 1024 * 1024
    # phase groups per period of an interval entry; None: sized from the entries (spread.py)
    phase_slots: int | None = None
    shard: Shard | None = None  # None: every entry; set it with for_shard()

    def for_shard(self, shard: Shard) -> ServiceSettings:
        """These settings for shard `shard`: it runs only its entries, and its client id (so
        its lwt entries' ids too) and status topic carry the `-K-of-N` suffix, so shards on
        one broker never take over each other's connections or status (docs/scaling.md)."""
        return replace(self, shard=shard, broker=self.broker.for_shard(shard))


def shard_path(path: Path, shard: Shard) -> Path:
    """A shard's own file beside `path`: `logs/state.db` -> `logs/state-1-of-2.db`. Shards
    started in one folder with the default paths then never share a state database or a log
    file (issue 27 #2)."""
    return path.with_name(f"{path.stem}-{shard.name}{path.suffix}")


def default_client_id(config_path: Path | None = None) -> str:
    """Stable across restarts and unique per host and config file: the host name, a digest of
    machine-id and, given the config file, a digest of its absolute path. Two services with
    different entries files on one host then never share a client id by default (two
    connections with one id knock each other off the broker). The path is made absolute but
    not resolved: a Kubernetes ConfigMap's symlink target changes at every update, the path
    the operator wrote does not."""
    host = socket.gethostname() or "host"
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = host
    digest = hashlib.sha256(machine.encode()).hexdigest()[:8]
    base = f"scheduler-publisher-{host[:24]}-{digest}"
    if config_path is None:
        return base
    # abspath, not resolve(): it folds "..", but does not follow symlinks (see above).
    where = os.path.abspath(config_path).encode("utf-8", "surrogateescape")  # noqa: PTH100
    return f"{base}-{hashlib.sha256(where).hexdigest()[:8]}"


def client_id_refusal(client_id: str, shard: Shard | None, status_topic: str | None) -> str | None:
    """Why `client_id` (a `--client-id`) cannot work once the names derived from it are made,
    or None: the shard adds its `-K-of-N` suffix, and without `status_topic` the status topic
    wraps it; both must stay MQTT strings and the topic a valid one. (An lwt entry's client id
    is cut to MAX_CLIENT_ID_LENGTH by entry_client_id, whatever this one's length.)"""
    main = shard.client_id(client_id) if shard else client_id
    size = len(client_id.encode("utf-8"))
    suffix = len(main.encode("utf-8")) - size
    wrap = len(_STATUS_TOPIC.format("")) if status_topic is None else 0
    limit = MQTT_STRING_BYTES - suffix - wrap
    if size > limit:
        return f"must be at most {limit} UTF-8 bytes{_derived(shard, wrap > 0)}, got {size}"
    if status_topic is None:
        topic = _STATUS_TOPIC.format(main)
        for finding in FIELDS_BY_NAME["topic"].check(topic):
            if finding.severity == "error":
                return (
                    f"would make the status topic {_STATUS_TOPIC.format('<client-id>')} "
                    f"invalid ({finding.message}); give --status-topic, or another client id"
                )
    return None


def _derived(shard: Shard | None, status_topic: bool) -> str:
    parts = [f"the shard's suffix -{shard.name}"] if shard else []
    if status_topic:
        parts.append(f"the status topic {_STATUS_TOPIC.format('<client-id>')}")
    if not parts:
        return ""
    return f" (with {' and '.join(parts)}, within MQTT's {MQTT_STRING_BYTES})"


def status_topic_refusal(status_topic: str, shard: Shard | None) -> str | None:
    """Why a `--status-topic` cannot work once the shard's `/K-of-N` level is added, or None."""
    if shard is None:
        return None
    for finding in FIELDS_BY_NAME["topic"].check(shard.status_topic(status_topic)):
        if finding.severity == "error":
            return f"with the shard's level /{shard.name} added, {finding.message}"
    return None
