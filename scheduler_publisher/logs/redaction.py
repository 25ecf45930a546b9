"""What a log line must never show: secrets, and control characters that drive a terminal.

`redact` is a structlog processor that runs before every renderer (setup.py), so no destination
sees a value it has not scrubbed. `escape_for_terminal` runs in the console renderer only:
JSON escapes controls by itself.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from structlog.typing import EventDict, WrappedLogger

__all__ = ["REDACTED", "escape_controls", "escape_for_terminal", "redact", "register_secret"]

REDACTED = "***"
_SENSITIVE_KEY = re.compile("password|passwd|secret|token|authorization", re.IGNORECASE)
# Written by the pipeline or the code, never by a peer: a registered secret that happens to be
# a substring of one ("mqtt", "publisher") must not rewrite it (and so give itself away).
_NEVER_REDACTED = frozenset(
    {"@timestamp", "level", "logger", "error.type", "_record", "_from_structlog"}
)
_SCALARS = (int, float, bool, type(None))


# --- secrets registry ------------------------------------------------------------------------
# Any thread may register; the pipeline reads the tuple without locking because registration
# swaps in a new immutable tuple.
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Redact every later log value that contains `value`."""
    global _secrets  # noqa: PLW0603 -- a process-wide registry is the point
    if not value:
        return
    with _secrets_lock:
        if value not in _secrets:
            _secrets = (*_secrets, value)


def _hide_secrets(text: str, secrets: tuple[str, ...]) -> str:
    """A value that carries a secret is replaced whole (a multi-line one, line by line).

    Replacing only the secret inside it would show where it sat, and so what it is, whenever
    the rest of the value is known: "paho.***.client" gives the password "mqtt" away.
    """
    if not any(secret in text for secret in secrets):
        return text
    if "\n" not in text:
        return REDACTED
    return "\n".join(
        REDACTED if any(s in line for s in secrets) else line for line in text.split("\n")
    )


def _clean(value: Any, secrets: tuple[str, ...]) -> Any:
    """Redact sensitive keys at any depth and, when secrets are registered, values carrying them."""
    if isinstance(value, str):
        return _hide_secrets(value, secrets) if secrets else value
    if isinstance(value, dict):
        return {k: _clean_field(k, v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, secrets) for v in value]
    if secrets and not isinstance(value, _SCALARS):
        # The renderers would str() it anyway; do it first so the text is scrubbed too.
        return _hide_secrets(str(value), secrets)
    return value


def _clean_field(key: Any, value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(key, str) and _SENSITIVE_KEY.search(key):
        return REDACTED
    return _clean(value, secrets)


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: sensitive keys become "***", and so does every value carrying a secret.

    Field names, logger names and our own event names are never touched; a foreign record's
    message is free text and is scrubbed like any value.
    """
    secrets = _secrets
    own_event = event_dict.get("_from_structlog", True)
    return {
        key: value
        if key in _NEVER_REDACTED or (key == "event" and own_event)
        else _clean_field(key, value, secrets)
        for key, value in event_dict.items()
    }


# C0 and C1 controls, DEL, and the bidi overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """Control characters as visible escapes (\\x1b), so a value cannot drive the terminal."""
    pattern = _CONTROL_KEEP_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(_escape_char, text)


def _escape_value(value: Any) -> Any:
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, dict):
        return {_escape_value(k): _escape_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_value(v) for v in value]
    return value


def escape_for_terminal(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor (console only; JSON escapes them itself): ids, topics and foreign messages
    come from files and peers, and must not reach a terminal as escape sequences."""
    return {
        escape_controls(str(key)): escape_controls(value, keep_newlines=True)
        if key == "exception" and isinstance(value, str)
        else _escape_value(value)
        for key, value in event_dict.items()
    }
