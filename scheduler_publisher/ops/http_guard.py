"""Who may reach the HTTP endpoints: pure checks on a request's headers, no I/O.

A page of another site, open in a user's browser, must not read `/status` nor post
`/reload`. The same-origin policy keeps it from reading answers, except through DNS
rebinding (its own name made to resolve to this server), which `HostCheck` stops; a form or
a `no-cors` fetch can still *send* a POST, which `cross_site_refusal` stops. The bearer token
guards `/reload` against everything else that can reach the port.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from email.message import Message

__all__ = ["FORM_TYPES", "HostCheck", "bearer_matches", "cross_site_refusal", "host_of", "shown"]


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 7235 section 2.1).
    Compared as bytes in constant time; an empty token (or credentials) never matches."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    given = credentials.strip().encode("latin-1", "replace")  # http.server decoded it so
    return (
        scheme.lower() == "bearer"
        and bool(given)
        and bool(token)
        and hmac.compare_digest(given, token.encode("utf-8"))
    )


def shown(text: str, limit: int = 80) -> str:
    """Client text quoted in an error, cut short: a path or header can be 64 KB."""
    return text if len(text) <= limit else text[:limit] + "…"


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_of(header: str) -> str | None:
    """The host part of a `Host:` value (`name`, `name:port`, `[v6]:port`), lower case and
    without a trailing dot; None when it is not one."""
    text = header.strip().lower()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        port_ok = rest == "" or (rest[:1] == ":" and rest[1:].isascii() and rest[1:].isdigit())
        ok = bracket and _ip_literal(host) and port_ok
        return host if ok else None
    host, colon, port = text.rpartition(":")
    if not colon:
        host = text
    elif not (port.isascii() and port.isdigit()):
        return None
    host = host.rstrip(".")
    return host if host and ":" not in host else None


@dataclass(frozen=True, slots=True)
class HostCheck:
    """The `Host:` headers this server answers. A DNS-rebinding page reaches the server under
    the attacker's name, so a name must be `localhost`, the --http-host name, or listed in
    --http-allowed-hosts; an IP address cannot be rebound and is always accepted, as is no
    Host at all (no browser omits it). Bound to all interfaces with no list, any Host goes:
    the names a server is reached by are not known then."""

    names: frozenset[str]
    any_host: bool

    @classmethod
    def of(cls, bound: str, allowed: Sequence[str]) -> HostCheck:
        listed = frozenset(name.lower().rstrip(".") for name in allowed)
        unspecified = not bound or (
            _ip_literal(bound) and ipaddress.ip_address(bound).is_unspecified
        )
        if "*" in listed or (not listed and unspecified):
            return cls(frozenset(), any_host=True)
        return cls(listed | {"localhost", bound.lower().rstrip(".")}, any_host=False)

    def allows(self, header: str | None) -> bool:
        if self.any_host or not header or not header.strip():
            return True
        host = host_of(header)
        return host is not None and (_ip_literal(host) or host in self.names)


# What a form, or a script of another site without a CORS preflight, can send as a body.
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})


def cross_site_refusal(headers: Message) -> tuple[int, str] | None:
    """Why a POST looks sent by another site's page (status and words), or None. Browsers
    say where a request comes from in `Sec-Fetch-Site` and `Origin`; a browser old enough to
    send neither still cannot send a form's body with a type other than FORM_TYPES."""
    site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
    if site and site not in ("same-origin", "none"):
        return 403, f"Sec-Fetch-Site: {shown(site)}: requests from other sites' pages are refused"
    origin = headers.get("Origin")
    if origin is not None and not _same_origin(origin, headers.get("Host")):
        return 403, f"Origin {shown(origin)!r} is not this server: cross-site posts are refused"
    media = (headers.get("Content-Type") or "").partition(";")[0].strip().lower()
    if media in FORM_TYPES:
        return 415, f"Content-Type {media}: form posts are refused; send no body (curl -X POST)"
    return None


def _same_origin(origin: str, host: str | None) -> bool:
    parts = urlsplit(origin.strip())
    return (
        parts.scheme in ("http", "https")
        and host is not None
        and parts.netloc.lower() == host.strip().lower()
    )
