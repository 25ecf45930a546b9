"""sd_notify(3) client: tells systemd we are ready, reloading, stopping, or alive.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines sent to the
socket named in ``$NOTIFY_SOCKET``; a leading ``@`` names a Linux abstract-namespace socket.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op returning ``False``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

# A blocking send to a full receive queue waits for PID 1 to drain it; bound that wait so a
# wedged manager cannot freeze the main loop (libsystemd blocks forever here).
_SEND_TIMEOUT_S = 5.0


def _parse_address(raw: str | None) -> str | None:
    """The sendto() address for $NOTIFY_SOCKET, or None for unset or unsupported forms."""
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    # Like sd_notify, accept only absolute paths: systemd >= 253 may also pass "vsock:...",
    # which needs AF_VSOCK (and the unit's RestrictAddressFamilies does not allow it).
    return raw if raw.startswith("/") else None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, as sd_watchdog_enabled(3) recommends pinging."""
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None  # the watchdog is meant for another process (e.g. our parent)
        except ValueError:
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


class SystemdNotifier:
    """Sends sd_notify messages over one lazily opened datagram socket; safe from any thread.

    The environment is read once, at construction; the constructor does no I/O.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._configured = bool(env.get("NOTIFY_SOCKET"))
        self._address = _parse_address(env.get("NOTIFY_SOCKET"))
        self._watchdog_interval = _watchdog_interval(env)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when systemd gave us a notification socket ($NOTIFY_SOCKET is set)."""
        return self._configured

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings, or None when the watchdog is off for us."""
        return self._watchdog_interval

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one datagram; False when disabled or the send failed. Never raises."""
        if self._address is None or not lines:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                sock = self._socket()
                sock.sendto(payload, self._address)
            except OSError:
                # The caller decides whether a lost notification is worth logging; a fresh
                # socket next time recovers from whatever state this one was left in.
                self._drop_socket()
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1, optionally with a STATUS= line."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def reloading(self) -> bool:
        """RELOADING=1 plus the MONOTONIC_USEC= that Type=notify-reload (systemd 253+) requires."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """STOPPING=1."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """STATUS=<text>, flattened to one line (a newline would start a new KEY=VALUE)."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket, if one is open; a later notify() opens a new one."""
        with self._lock:
            self._drop_socket()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(_SEND_TIMEOUT_S)
            self._sock = sock
        return self._sock

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):  # notify() promises never to raise
                sock.close()


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.splitlines())
