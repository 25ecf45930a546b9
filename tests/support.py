"""Real parts for the tests (and the benchmark): a Mosquitto per test, a recording subscriber,
and the one way to run each of the service and its HTTP API.

- brokers and clients: `Mosquitto`, `free_port`, `Subscriber`, `unique_topic`;
- entries files: `entry`, `write_config`;
- the service in-process: `InProcessServices` (on `in_process_settings`);
- the service as the real CLI: `ServiceProcess`, with its arguments from `cli_args`;
- HTTP: `request` / `call` (any status is a `Reply`), `get` / `post` on an in-process service,
  and `metrics` with its sample readers.

Nothing here sleeps to synchronise: every wait polls a condition against a deadline. Nothing
here needs pytest, so bench/ can import it with the repository on sys.path.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

if TYPE_CHECKING:  # the service's modules load only where a test starts one
    from scheduler_publisher.clock import Clock
    from scheduler_publisher.mqtt.netloop import NetworkLoop
    from scheduler_publisher.service import PublisherService
    from scheduler_publisher.settings import ServiceSettings

REPO = Path(__file__).resolve().parent.parent
OPTIONS_FILE_ENV = "SCHEDULER_PUBLISHER_OPTIONS_FILE"
# What a gateway's shell or a systemd drop-in may set for the installed service; a test run on
# such a machine must not pick it up.
_AMBIENT = ("MQTT_PASSWORD", "CREDENTIALS_DIRECTORY")


def hermetic_environ(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """`environ` without the service's own variables and with no options file: a test's
    service reads neither /etc/scheduler-publisher/scheduler-publisher.toml nor what the
    machine's shell sets, unless the test names a file or a variable itself."""
    kept = {
        name: text
        for name, text in environ.items()
        if not name.startswith("SCHEDULER_PUBLISHER_") and name not in _AMBIENT
    }
    return {**kept, OPTIONS_FILE_ENV: ""}


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port from inside it (what
    binding port 0 gives) can be handed out as the *source* port of one of the service's own
    reconnect attempts while the broker is down; Linux then connects that socket to itself,
    and the restarted broker cannot bind its port. That is the likely cause of the one CI run
    in which a restarted broker never accepted (its log was gone with the run)."""
    high = min(_ephemeral_start(), 32768)
    for _ in range(200):
        port = random.randrange(high - 12000, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free loopback port below {high}")


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.02, message: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `message` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        threading.Event().wait(interval)  # a poll step, not a synchronisation sleep


def session_free_loop() -> NetworkLoop:
    """A started network loop without sessions: the thread a Schedule runs on, without MQTT
    (the service's Schedule runs on its connection manager's loop). Stop it with `stop()`."""
    from scheduler_publisher.mqtt.netloop import NetworkLoop, SessionListener  # noqa: PLC0415
    from scheduler_publisher.settings import BrokerSettings  # noqa: PLC0415

    # No session is ever opened, so the listener is never called.
    loop = NetworkLoop(BrokerSettings(client_id="no-sessions"), cast("SessionListener", None))
    loop.start()
    return loop


def group_ids(count: int, interval: float) -> list[str]:
    """`count` entry ids that share one phase slot (plan.grid_start): one scheduler wake-up
    runs them all."""
    from scheduler_publisher.scheduling.plan import grid_start  # noqa: PLC0415

    ids: list[str] = []
    start = grid_start("g-0", interval)
    n = 0
    while len(ids) < count:
        candidate = f"g-{n}"
        if grid_start(candidate, interval) == start:
            ids.append(candidate)
        n += 1
    return ids


def unique_topic(name: str = "t") -> str:
    return f"sp-test/{uuid.uuid4().hex[:10]}/{name}"


class Mosquitto:
    """A real broker on a free loopback port with its own config file."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = "") -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "user root\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 0\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"log_dest file {self.log}\n"
            f"{self.extra}\n"
        )

        def raise_nofile() -> None:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            target = hard if hard != resource.RLIM_INFINITY else 65536
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, target), hard))

        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], preexec_fn=raise_nofile)  # noqa: PLW1509
        wait_until(self._accepts, 10, message=f"mosquitto on port {self.port}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float  # time.monotonic() on arrival
    # MQTT 5 properties as paho's Properties.json() names them ("MessageExpiryInterval",
    # "UserProperty" as a list of pairs, ...); empty when the message carried none.
    properties: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A recording client: everything it receives lands in `messages`, in arrival order."""

    port: int
    topics: list[str]
    qos: int = 2
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sub-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(t, self.qos) for t in self.topics])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            # paho's Properties is untyped.
            props = msg.properties.json() if msg.properties is not None else {}  # type: ignore[no-untyped-call]
            self.messages.append(
                Received(
                    msg.topic,
                    bytes(msg.payload),
                    msg.qos,
                    bool(msg.retain),
                    time.monotonic(),
                    props,
                )
            )

    def start(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscription not acknowledged"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def wait_for(
        self,
        topic: str,
        count: int = 1,
        timeout: float = 10,
        where: Callable[[Received], bool] = lambda m: True,
    ) -> list[Received]:
        def got() -> list[Received] | None:
            hits = [m for m in self.on(topic) if where(m)]
            return hits if len(hits) >= count else None

        result: list[Received] = wait_until(got, timeout, message=f"{count} message(s) on {topic}")
        return result


SubscriberFactory = Callable[..., Subscriber]  # the conftest fixture's type


def barrier(port: int, sub: Subscriber, topic: str, qos: int = 1) -> None:
    """Publish a marker to `topic` through the broker and wait until `sub` has it: whatever
    the broker had queued for `sub` before it has arrived too."""
    marker = uuid.uuid4().hex.encode()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, marker, qos=qos).wait_for_publish(10)
        sub.wait_for(topic, where=lambda m: m.payload == marker, timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


class ServiceProcess:
    """The real `python -m scheduler_publisher` in a child process; its JSON log lines are kept."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        max_open_files: int | None = None,
        before_exec: Callable[[], None] | None = None,
    ) -> None:
        """`args` as cli_args() builds them; `env` adds to a hermetic environment (no options
        file, none of the service's variables from the caller's); `before_exec` runs in the
        child (setrlimit and signal dispositions only: the child of a threaded parent may call
        little else)."""
        full_env = {**hermetic_environ(os.environ), "PYTHONUNBUFFERED": "1", **(env or {})}

        def limit() -> None:  # in the child, before exec: its `ulimit -n`, and the hook
            if max_open_files is not None:
                _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, hard))
            if before_exec is not None:
                before_exec()

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_publisher", *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=limit,  # noqa: PLW1509 - the child only calls setrlimit and signal
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sink.append(line)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.stdout):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def wait_for_event(
        self,
        name: str,
        timeout: float = 15,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in self.events():
                if e.get("message") == name and where(e):
                    return e
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"service exited ({self.proc.returncode}) before {name!r}:\n"
                    + "\n".join(self.stdout[-20:] + self.stderr[-20:])
                )
            return None

        result: dict[str, Any] = wait_until(found, timeout, message=f"log event {name!r}")
        return result

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for t in self._threads:
            t.join(5)


def payload_is(expected: Any) -> Callable[[Received], bool]:
    """A `where=` filter: the message's JSON equals `expected`."""
    return lambda m: bool(m.payload) and m.json() == expected


def json_has(**fields: Any) -> Callable[[Received], bool]:
    """A `where=` filter: the message's JSON object has these fields with these values."""
    return lambda m: bool(m.payload) and fields.items() <= m.json().items()


def online(m: Received) -> bool:
    """An `{"online": 1, ...}` payload (a publish or a birth)."""
    return bool(m.payload) and m.json().get("online") == 1


def offline(m: Received) -> bool:
    """An `{"online": 0, ...}` payload (a will or an explicit offline announcement)."""
    return bool(m.payload) and m.json().get("online") == 0


def write_config(path: Path, entries: list[dict[str, Any]]) -> None:
    """Write atomically, as a careful operator's tooling would."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=2))
    tmp.replace(path)


def entry(id_: str, topic: str, interval: float = 1, **extra: Any) -> dict[str, Any]:
    """An entries-file entry; `data` defaults to {"sensor": id_}, other fields pass through."""
    return {
        "id": id_,
        "topic": topic,
        "data": extra.pop("data", {"sensor": id_}),
        "interval": interval,
        **extra,
    }


def iter_json(lines: list[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue


def in_process_settings(
    config_path: Path, broker_port: int, *, broker: dict[str, Any] | None = None, **overrides: Any
) -> ServiceSettings:
    """ServiceSettings for an in-process service: test broker, unique client id, no state DB and
    no HTTP unless asked for (the defaults would write logs/state.db and bind port 8080).
    `broker` overrides BrokerSettings fields (backoff, client_id, protocol, ...)."""
    from scheduler_publisher.settings import BrokerSettings, ServiceSettings  # noqa: PLC0415

    broker_settings = BrokerSettings(
        **{
            "host": "127.0.0.1",
            "port": broker_port,
            "backoff_min": 0.1,
            "backoff_max": 0.5,
            "client_id": f"sp-test-{uuid.uuid4().hex[:10]}",
            **(broker or {}),
        }
    )
    return ServiceSettings(
        **{
            "config_path": config_path,
            "broker": broker_settings,
            "state_db": None,
            "http_port": 0,
            **overrides,
        }
    )


class InProcessServices:
    """The one in-process launcher: writes the entries, starts a PublisherService on
    `in_process_settings`, and at close() stops every service it started, in start order.

    A fixture that wraps it should depend on the broker fixtures it uses, so that pytest stops
    the services before the brokers."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[PublisherService] = []

    def create(
        self,
        broker_port: int,
        entries: list[dict[str, Any]] | None = None,
        *,
        config: Path | None = None,
        broker: dict[str, Any] | None = None,
        clock: Clock | None = None,
        **overrides: Any,
    ) -> PublisherService:
        """A service not yet started, for a test that starts it itself (inside capture_logs,
        say); close() stops it all the same. `config` defaults to a new file per service;
        `entries` (if given) are written to it."""
        from scheduler_publisher.service import PublisherService  # noqa: PLC0415

        config = config or self.workdir / f"config-{len(self.started)}.json"
        if entries is not None:
            write_config(config, entries)
        service = PublisherService(
            in_process_settings(config, broker_port, broker=broker, **overrides), clock=clock
        )
        self.started.append(service)
        return service

    def start(
        self,
        broker_port: int,
        entries: list[dict[str, Any]] | None = None,
        *,
        config: Path | None = None,
        broker: dict[str, Any] | None = None,
        clock: Clock | None = None,
        loop: bool = True,
        **overrides: Any,
    ) -> PublisherService:
        """create(), then start the service; `loop=False` leaves its main loop to the test,
        which turns it with service.step()."""
        service = self.create(
            broker_port, entries, config=config, broker=broker, clock=clock, **overrides
        )
        service.start(loop=loop)
        return service

    def close(self) -> None:
        """Stop every service created; stopping one a test already stopped returns at once."""
        for service in self.started:
            service.stop()


def cli_args(
    broker_port: int,
    config: Path | None,
    *extra: str,
    command: tuple[str, ...] = ("run",),
    http_port: int = 0,
    state_db: Path | None = None,
    log_file: Path | None = None,
    client_id: str | None = None,
    backoff: tuple[float, float] | None = None,
) -> list[str]:
    """The one builder of the CLI's argument list for a test run: the broker on loopback, an
    HTTP port (0: none of its own), no state database or log file unless given (the defaults
    would write under ./logs/), and `client_id` or else a unique one (tests share brokers'
    port ranges, never client ids). `extra` comes last, so it can override any of these."""
    args = [*command, "--broker", "127.0.0.1", "--port", str(broker_port)]
    if config is not None:
        args += ["--config", str(config)]
    args += [
        "--http-port",
        str(http_port),
        "--state-db",
        str(state_db or ""),
        "--log-file",
        str(log_file or ""),
    ]
    args += ["--client-id", client_id or f"sp-test-{uuid.uuid4().hex[:8]}"]
    if backoff is not None:
        args += ["--backoff-min", str(backoff[0]), "--backoff-max", str(backoff[1])]
    return [*args, *extra]


# ---- HTTP: one small client for every test ---------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: Message = field(default_factory=Message)

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10,
) -> Reply:
    """Any method, any headers, to 127.0.0.1; every status is a Reply, never an exception (the
    body as sent: http.client reads none for HEAD)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, r.read(), r.headers.get("Content-Type", ""), r.headers)
    finally:
        conn.close()


def call(
    port: int,
    path: str,
    method: str = "GET",
    token: str | None = None,
    authorization: str | None = None,
    timeout: float = 10,
) -> Reply:
    """GET (or `method`) with an optional bearer token or a whole Authorization header."""
    headers = (
        {"Authorization": authorization or f"Bearer {token}"} if (token or authorization) else {}
    )
    return request(port, method, path, headers, b"" if method == "POST" else None, timeout)


class ServesHttp(Protocol):
    """What the HTTP helpers need of an in-process service: its bound HTTP port."""

    @property
    def http(self) -> HasPort: ...


class HasPort(Protocol):
    @property
    def port(self) -> int: ...


def get(service: ServesHttp, path: str) -> Reply:
    return call(service.http.port, path)


def post(
    service: ServesHttp, path: str, token: str | None = None, authorization: str | None = None
) -> Reply:
    return call(service.http.port, path, "POST", token, authorization)


def metrics(service: ServesHttp) -> dict[str, Any]:
    """GET /metrics, parsed into its metric families by name."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    reply = get(service, "/metrics")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(reply.body.decode())}


def samples(
    families: dict[str, Any], family: str, sample: str | None = None, **labels: str
) -> list[float]:
    """Values of the samples named `sample` (default: the family) whose labels include `labels`."""
    name = sample or family
    return [
        s.value
        for s in families[family].samples
        if s.name == name and labels.items() <= s.labels.items()
    ]


def value(families: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    (found,) = samples(families, family, sample, **labels)
    return found


def counter(families: dict[str, Any], family: str, **labels: str) -> float:
    """A counter's value; a per-entry one is 0 before the entry's first tick creates it."""
    found = samples(families, family, f"{family}_total", **labels)
    assert labels or len(found) == 1, f"{family}: one unlabelled sample expected, got {found}"
    return sum(found)


ServiceStarter = Callable[..., "PublisherService"]  # an in-process start_service fixture's type


@dataclass
class Datagram:
    lines: list[str]
    at: float  # time.monotonic() on arrival


class NotifySocket:
    """The manager's end of $NOTIFY_SOCKET: a bound unix datagram socket whose datagrams a
    background thread records, in arrival order, with their arrival time."""

    def __init__(self, path: Path) -> None:
        assert len(str(path)) < 100, "AF_UNIX paths are limited to 107 bytes"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._datagrams: list[Datagram] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                raw = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._datagrams.append(Datagram(raw.decode().split("\n"), time.monotonic()))

    def datagrams(self, since: float = 0.0) -> list[Datagram]:
        """Everything received at or after monotonic time `since`."""
        with self._lock:
            return [d for d in self._datagrams if d.at >= since]

    def with_line(self, prefix: str, since: float = 0.0) -> list[Datagram]:
        return [d for d in self.datagrams(since) if any(x.startswith(prefix) for x in d.lines)]

    def wait_for(
        self, prefix: str, count: int = 1, timeout: float = 10, since: float = 0.0
    ) -> list[Datagram]:
        """At least `count` datagrams with a line starting with `prefix`, received after `since`."""

        def got() -> list[Datagram] | None:
            hits = self.with_line(prefix, since)
            return hits if len(hits) >= count else None

        result: list[Datagram] = wait_until(got, timeout, message=f"{count} x {prefix!r}")
        return result

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self.sock.close()
