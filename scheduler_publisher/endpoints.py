"""A broker endpoint: where and how to reach one broker (scheme, host, port, TLS, TCP or
WebSockets and the WebSocket path), and the grammar of `--broker`: `host`, `host:port`,
`[v6]:port`, or an `mqtt://`, `mqtts://`, `ws://` or `wss://` URL, several separated by commas.

Pure: the CLI names the option a problem came from (a flag, a variable, the options file) and
checks the text against `--port` and `--tls`; settings and mqtt/ only see `Endpoint`s.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["mqtt", "mqtts", "ws", "wss"]
Transport = Literal["tcp", "websockets"]
SCHEMES: tuple[Scheme, ...] = ("mqtt", "mqtts", "ws", "wss")
DEFAULT_PORTS: dict[Scheme, int] = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
TLS_SCHEMES = frozenset({"mqtts", "wss"})
DEFAULT_WS_PATH = "/mqtt"  # Mosquitto's, HiveMQ's and EMQX's default
# A DNS name (with "_", which some private zones use) or an IPv4 address; IPv6 goes in [ ].
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
# What a WebSocket path may hold without escaping (RFC 3986 pchar and "/", less "@", taken
# for credentials, and ",", which separates brokers), and "%XX".
_PATH = re.compile(r"/(?:[A-Za-z0-9._~!$&'()*+;=:/-]|%[0-9A-Fa-f]{2})*")
_SHOWN_LIMIT = 80
EXPECTED = "a host, host:port, [IPv6]:port, or an mqtt://, mqtts://, ws:// or wss:// URL"


class EndpointError(ValueError):
    """Text that is no broker endpoint; the message says what was received and expected."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One broker, fully resolved: what a connection needs and what logs and /status show."""

    scheme: Scheme
    host: str
    port: int
    path: str = ""  # the WebSocket path; "" for mqtt:// and mqtts://

    @property
    def tls(self) -> bool:
        return self.scheme in TLS_SCHEMES

    @property
    def transport(self) -> Transport:
        return "websockets" if self.scheme in ("ws", "wss") else "tcp"

    @property
    def url(self) -> str:
        """The URL shown in logs, /status and show-options. It never holds credentials: the
        parser refuses a URL with any."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class Given:
    """What one broker's text says, before `--port` and `--tls` fill what it leaves open."""

    text: str
    scheme: Scheme | None  # None: a bare host
    host: str
    port: int | None
    path: str | None  # ws(s) only; None: not given

    def endpoint(self, port: int | None, tls: bool) -> Endpoint:
        """The endpoint, with the port from `port` and TLS from `tls` where the text says
        nothing. Whether they contradict the text is the caller's check (it names both)."""
        scheme: Scheme = self.scheme or ("mqtts" if tls else "mqtt")
        chosen = self.port or port or DEFAULT_PORTS[scheme]
        path = (self.path or DEFAULT_WS_PATH) if scheme in ("ws", "wss") else ""
        return Endpoint(scheme, self.host, chosen, path)


def endpoint_of(text: str, port: int | None = None, tls: bool = False) -> Endpoint:
    """One endpoint from text alone (a Python caller's convenience)."""
    return parse_one(text).endpoint(port, tls)


def parse_list(text: str) -> tuple[Given, ...]:
    """`--broker`'s value: one broker, or several separated by commas (blanks around ignored)."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise EndpointError(f"must name a broker ({EXPECTED}), got {shown(text)}")
    if not all(parts):
        raise EndpointError(f"has an empty item in its comma-separated list, got {shown(text)}")
    return tuple(parse_one(part) for part in parts)


def parse_one(text: str) -> Given:
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text) or not text:
        raise EndpointError(f"must be {EXPECTED}, without spaces, got {shown(text)}")
    scheme_text, sep, rest = text.partition("://")
    if not sep:
        host, port = _authority(text, text)
        return Given(text, None, host, port, None)
    scheme = scheme_text.lower()
    if scheme not in SCHEMES:
        raise EndpointError(
            f"has the unknown scheme {scheme_text!r}; expected {EXPECTED}, got {shown(text)}"
        )
    return _url(text, _scheme(scheme), rest)


def _scheme(name: str) -> Scheme:
    for scheme in SCHEMES:
        if scheme == name:
            return scheme
    raise AssertionError(name)


def _url(text: str, scheme: Scheme, rest: str) -> Given:
    # Any "@" is taken for credentials (a password may hold "/", "?" or "#"), so none is
    # ever echoed or used as a host; a WebSocket path then cannot hold one either.
    if "@" in rest:
        raise EndpointError(
            f"must not hold credentials (user:password@); give --username and "
            f"--password-file, got {shown(text)}"
        )
    if "?" in rest or "#" in rest:
        raise EndpointError(f"must not have a query or fragment (? or #), got {shown(text)}")
    authority, slash, path = rest.partition("/")
    host, port = _authority(authority, text)
    if not slash:
        return Given(text, scheme, host, port, None)
    if scheme in ("mqtt", "mqtts"):
        if path:
            raise EndpointError(f"has a path, which only ws:// and wss:// take, got {shown(text)}")
        return Given(text, scheme, host, port, None)
    if not _PATH.fullmatch("/" + path):
        raise EndpointError(f"has a WebSocket path with characters to escape, got {shown(text)}")
    return Given(text, scheme, host, port, "/" + path)


def _authority(authority: str, text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 address (no port)."""
    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if not bracket or not _is_ipv6(inside):
            raise EndpointError(f"has no valid IPv6 address in [ ], got {shown(text)}")
        if after and not after.startswith(":"):
            raise EndpointError(f"must have :port after ], got {shown(text)}")
        return inside, _port(after[1:], text) if after else None
    if authority.count(":") > 1:
        if _is_ipv6(authority):
            return authority, None
        raise EndpointError(f"must put an IPv6 address in [ ], got {shown(text)}")
    host, colon, port = authority.partition(":")
    if not host:
        raise EndpointError(f"has no host, got {shown(text)}")
    if not _HOST.fullmatch(host):
        raise EndpointError(
            f"has an invalid host {host!r} (letters, digits, '-', '_', '.'), got {shown(text)}"
        )
    return host, _port(port, text) if colon else None


def _port(port: str, text: str) -> int:
    if not port.isascii() or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
        raise EndpointError(f"has an invalid port {port!r} (1 to 65535), got {shown(text)}")
    return int(port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def shown(text: str) -> str:
    """The text received, for a message: a password in it replaced, control characters escaped,
    cut to a readable length."""
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        userinfo, _, after = rest.rpartition("@")
        user = userinfo.partition(":")[0]
        redacted = f"{user}:<redacted>" if ":" in userinfo else user
        text = f"{scheme}://{redacted}@{after}"
    quoted = repr(text)
    return quoted if len(quoted) <= _SHOWN_LIMIT else quoted[: _SHOWN_LIMIT - 4] + "...'"
