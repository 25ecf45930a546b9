"""The checks on who may reach the HTTP endpoints, as pure functions of the headers (their
behaviour over HTTP, and in a browser, is in test_http.py and test_status_page.py)."""

from __future__ import annotations

from email.message import Message

import pytest

from scheduler_publisher.ops.http_guard import (
    HostCheck,
    bearer_matches,
    cross_site_refusal,
    host_of,
)


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("gw.lan", "gw.lan"),
        ("GW.Lan.:8080", "gw.lan"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1", None),
        ("[gw.lan]:80", None),
        ("gw.lan:http", None),
        ("::1", None),  # an IPv6 address in Host is bracketed
        (":8080", None),
        ("gw.lan:\u0668\u0660", None),  # Arabic-Indic digits are no port
    ],
)
def test_host_of_reads_the_host_part(header: str, host: str | None) -> None:
    """The host of a Host header, lower case, without port or trailing dot; None if malformed."""
    assert host_of(header) == host


def test_on_loopback_only_localhost_addresses_and_the_list_are_answered() -> None:
    """Bound to loopback: localhost, IP addresses, the listed names; no other name."""
    check = HostCheck.of("127.0.0.1", ["Gateway.LAN."])
    for header in ("localhost:8080", "127.0.0.1", "10.0.0.7:8080", "[::1]:1", "gateway.lan", None):
        assert check.allows(header), header
    for header in ("evil.example", "localhost.evil.example", "gateway.lan.evil.example", "a b"):
        assert not check.allows(header), header


@pytest.mark.parametrize("bound", ["0.0.0.0", "::", ""])
def test_on_all_interfaces_any_host_unless_a_list_is_given(bound: str) -> None:
    """Bound to all interfaces, no list: any name; with a list, the list."""
    assert HostCheck.of(bound, []).allows("evil.example")
    assert not HostCheck.of(bound, ["gw.lan"]).allows("evil.example")
    assert HostCheck.of(bound, ["gw.lan"]).allows("gw.lan:8080")
    assert HostCheck.of("127.0.0.1", ["*"]).allows("evil.example")


def headers(**values: str) -> Message:
    message = Message()
    for name, value in values.items():
        message[name.replace("_", "-")] = value
    return message


@pytest.mark.parametrize(
    ("given", "status"),
    [
        ({"Origin": "http://evil.example", "Host": "127.0.0.1:8080"}, 403),
        ({"Origin": "null", "Host": "127.0.0.1:8080"}, 403),
        ({"Origin": "http://127.0.0.1:8080"}, 403),  # no Host to compare with
        ({"Sec_Fetch_Site": "same-site"}, 403),
        ({"Content_Type": "text/plain; charset=utf-8"}, 415),
        ({"Content_Type": "MULTIPART/FORM-DATA; boundary=x"}, 415),
        ({"Origin": "http://127.0.0.1:8080", "Host": "127.0.0.1:8080"}, None),
        ({"Sec_Fetch_Site": "same-origin", "Content_Type": "application/json"}, None),
        ({}, None),
    ],
)
def test_cross_site_posts_are_told_apart(given: dict[str, str], status: int | None) -> None:
    """Another origin, a Sec-Fetch-Site other than same-origin/none, or a form's type."""
    refusal = cross_site_refusal(headers(**given))
    assert (refusal[0] if refusal else None) == status


def test_bearer_compares_bytes_and_never_matches_empty() -> None:
    """Only `Bearer <token>` matches; an empty token or empty credentials never do."""
    assert bearer_matches("Bearer s3cret", "s3cret")
    assert bearer_matches("bearer   s3cret  ", "s3cret")
    for header in ("Bearer", "Bearer ", "Bearer s3cre", "Basic s3cret", "s3cret", None):
        assert not bearer_matches(header, "s3cret"), header
    assert not bearer_matches("Bearer", "")
    assert not bearer_matches("Bearer x", "")
    # A UTF-8 token sent raw arrives as http.server's Latin-1 text, and still matches.
    assert bearer_matches("Bearer " + "tök".encode().decode("latin-1"), "tök")
