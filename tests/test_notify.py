"""SystemdNotifier against a real unix datagram socket that the test owns, as systemd would."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler_publisher.ops.notify import SystemdNotifier

RECV_TIMEOUT_S = 5.0


class Listener:
    """The manager's end of $NOTIFY_SOCKET: a bound datagram socket that waits with a timeout."""

    def __init__(self, address: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(RECV_TIMEOUT_S)
        self.address = address
        self.env_value = env_value

    def lines(self) -> list[str]:
        return self.sock.recv(65536).decode().split("\n")

    def assert_empty(self) -> None:
        self.sock.settimeout(0)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(65536)
        finally:
            self.sock.settimeout(RECV_TIMEOUT_S)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    address = str(tmp_path / "notify.sock")
    assert len(address) < 100, "AF_UNIX paths are limited to 107 bytes"
    listener = Listener(address, address)
    yield listener
    listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"sp-test-notify-{uuid.uuid4().hex}"
    listener = Listener("\0" + name, "@" + name)
    yield listener
    listener.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    fixture = "path_listener" if request.param == "path" else "abstract_listener"
    result: Listener = request.getfixturevalue(fixture)
    return result


def notifier_for(listener: Listener, **extra: str) -> SystemdNotifier:
    return SystemdNotifier({"NOTIFY_SOCKET": listener.env_value, **extra})


def test_ready_sends_ready_and_status(listener: Listener) -> None:
    """ready() sends READY=1 and STATUS= in a single datagram."""
    n = notifier_for(listener)
    assert n.enabled
    assert n.ready("connected, 3 jobs") is True
    assert listener.lines() == ["READY=1", "STATUS=connected, 3 jobs"]


def test_ready_without_status(path_listener: Listener) -> None:
    """ready() without a status sends only READY=1."""
    assert notifier_for(path_listener).ready() is True
    assert path_listener.lines() == ["READY=1"]


def test_reloading_carries_monotonic_usec(listener: Listener) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC= taken from CLOCK_MONOTONIC."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier_for(listener).reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = listener.lines()
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping_and_watchdog(listener: Listener) -> None:
    """stopping() and watchdog() each send their single line."""
    n = notifier_for(listener)
    assert n.stopping() is True
    assert listener.lines() == ["STOPPING=1"]
    assert n.watchdog() is True
    assert listener.lines() == ["WATCHDOG=1"]


def test_status_is_flattened_to_one_line(path_listener: Listener) -> None:
    """status() turns newlines into spaces so the text cannot inject another KEY=VALUE."""
    assert notifier_for(path_listener).status("broker down\nREADY=1\r\nretrying") is True
    assert path_listener.lines() == ["STATUS=broker down READY=1 retrying"]


def test_notify_joins_arbitrary_lines(path_listener: Listener) -> None:
    """notify() sends any KEY=VALUE lines as one datagram; no lines sends nothing."""
    n = notifier_for(path_listener)
    assert n.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=slow start") is True
    assert path_listener.lines() == ["EXTEND_TIMEOUT_USEC=5000000", "STATUS=slow start"]
    assert n.notify() is False
    path_listener.assert_empty()


def test_disabled_without_notify_socket() -> None:
    """Without NOTIFY_SOCKET the notifier is disabled and every call returns False."""
    n = SystemdNotifier({})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert [n.ready("x"), n.reloading(), n.stopping(), n.status("x"), n.watchdog()] == [False] * 5


def test_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, path_listener: Listener
) -> None:
    """With no mapping given, the process environment is read at construction."""
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = SystemdNotifier()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert n.enabled
    assert n.watchdog_interval == 1.0
    assert n.ready() is True
    assert path_listener.lines() == ["READY=1"]


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """watchdog_interval is WATCHDOG_USEC / 2, in seconds."""
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert SystemdNotifier({"WATCHDOG_USEC": "1"}).watchdog_interval == 0.0000005


@pytest.mark.parametrize("usec", ["", "abc", "0", "-5", "1.5"])
def test_watchdog_interval_none_when_invalid(usec: str) -> None:
    """A missing, non-integer or non-positive WATCHDOG_USEC means no watchdog."""
    assert SystemdNotifier({"WATCHDOG_USEC": usec}).watchdog_interval is None


def test_watchdog_pid_rule() -> None:
    """WATCHDOG_PID naming another process (or garbage) turns the watchdog off; ours keeps it."""
    usec = {"WATCHDOG_USEC": "10000000"}
    assert SystemdNotifier({**usec, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 5.0
    assert SystemdNotifier({**usec, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert SystemdNotifier({**usec, "WATCHDOG_PID": "nope"}).watchdog_interval is None


def test_vanished_socket_returns_false_then_recovers(path_listener: Listener) -> None:
    """A socket that went away makes notify() return False without raising; a new one works."""
    n = notifier_for(path_listener)
    assert n.ready() is True
    assert path_listener.lines() == ["READY=1"]

    path_listener.close()  # bound file still exists: ECONNREFUSED
    assert n.watchdog() is False
    Path(path_listener.address).unlink()  # file gone too: ENOENT
    assert n.watchdog() is False

    again = Listener(path_listener.address, path_listener.env_value)
    try:
        assert n.watchdog() is True
        assert again.lines() == ["WATCHDOG=1"]
    finally:
        again.close()


def test_never_existing_socket_returns_false(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET that never existed (or is an unsupported form) yields False, not an error."""
    assert SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "absent")}).ready() is False
    assert SystemdNotifier({"NOTIFY_SOCKET": "@sp-test-" + uuid.uuid4().hex}).ready() is False
    assert SystemdNotifier({"NOTIFY_SOCKET": "relative/sock"}).ready() is False
    assert SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}).ready() is False


def test_concurrent_senders_each_deliver_one_intact_datagram(path_listener: Listener) -> None:
    """Many threads sharing one notifier deliver every message whole."""
    n = notifier_for(path_listener)
    count = 200
    results: list[bool] = []
    results_lock = threading.Lock()

    def send(i: int) -> None:
        ok = n.notify(f"STATUS=message {i}", "X=1")
        with results_lock:
            results.append(ok)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    received = [path_listener.lines() for _ in range(count)]  # drain while they send
    for t in threads:
        t.join(RECV_TIMEOUT_S)
    assert results == [True] * count
    expected = sorted(f"STATUS=message {i}" for i in range(count))
    assert sorted(lines[0] for lines in received) == expected
    assert all(lines[1:] == ["X=1"] for lines in received)
    n.close()
