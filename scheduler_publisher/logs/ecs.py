"""The shape of a log line in Elastic Common Schema 9.4: field names, types, order and size.

Pure steps on a structlog event dict; `setup.py` runs them on every JSON line, ours and foreign
stdlib records alike. The rules (docs/logging.md):

- the line starts with `@timestamp`, `log.level`, `message` (the ecs-logging spec's order),
  then `ecs.version`, `log.logger`, `service.name`, `service.version`, `process.pid`;
- keys are flat dotted names ("error.message"), as the spec asks for `log.level` and
  `ecs.version`; Filebeat's `expand_keys` and Elasticsearch both read them as objects;
- a field that ECS defines carries ECS's type; the project's own fields use names ECS does not
  define, and anything else that starts with an ECS top-level name moves under `NAMESPACE`;
- long lists are capped and, as a last resort, long strings are cut, so a line stays under
  `MAX_LINE_BYTES` (journald splits longer lines into fragments).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from structlog.typing import EventDict

__all__ = [
    "ECS_ROOTS",
    "ECS_VERSION",
    "LIST_LIMIT",
    "MAX_LINE_BYTES",
    "NAMESPACE",
    "cap_lists",
    "render_line",
    "shape",
]

ECS_VERSION = "9.4.0"
NAMESPACE = "scheduler_publisher"
# A whole line, with journald's "<N>" prefix and the newline, stays within 8 KiB.
MAX_LINE_BYTES = 8192
_MAX_JSON_CHARS = MAX_LINE_BYTES - len("<7>\n")
LIST_LIMIT = 20
_MIN_STRING = 200  # a cut string keeps at least this much

# Every top-level name in ECS 9.4 (`fields.csv`, checked by tests/test_ecs.py). A field of ours
# starting with one of these would collide with the object or type ECS gives that name.
ECS_ROOTS = frozenset(
    {
        "@timestamp",
        "agent",
        "client",
        "cloud",
        "container",
        "data_stream",
        "destination",
        "device",
        "dll",
        "dns",
        "ecs",
        "email",
        "entity",
        "error",
        "event",
        "faas",
        "file",
        "gen_ai",
        "group",
        "host",
        "http",
        "labels",
        "log",
        "message",
        "network",
        "observer",
        "orchestrator",
        "organization",
        "package",
        "process",
        "registry",
        "related",
        "rule",
        "server",
        "service",
        "source",
        "span",
        "tags",
        "threat",
        "tls",
        "trace",
        "transaction",
        "url",
        "user",
        "user_agent",
        "volume",
        "vulnerability",
    }
)

# The ECS fields this project writes, with the JSON type their ECS type stands for.
ECS_TYPES: dict[str, type | tuple[type, ...]] = {
    "@timestamp": str,
    "log.level": str,
    "message": str,
    "ecs.version": str,
    "log.logger": str,
    "service.name": str,
    "service.version": str,
    "process.pid": int,
    "process.exit_code": int,
    "event.action": str,
    "error.message": str,
    "error.type": str,
    "error.stack_trace": str,
    "server.address": str,
    "server.port": int,
    "url.full": str,
}
# Never cut when a line is too long: short, fixed, and what every query filters on.
_KEEP_WHOLE = frozenset(
    {
        "@timestamp",
        "log.level",
        "ecs.version",
        "service.name",
        "service.version",
        "process.pid",
        "event.action",
    }
)


def shape(event_dict: EventDict, *, service_name: str, service_version: str, pid: int) -> EventDict:
    """Rename structlog's keys to ECS, add the constant fields, and move colliding names."""
    own = bool(event_dict.pop("_from_structlog", True))
    event_dict.pop("_record", None)
    event = event_dict.pop("event", None)
    message = event if isinstance(event, str) else str(event)
    shaped: EventDict = {
        "@timestamp": event_dict.pop("@timestamp", None),
        "log.level": event_dict.pop("level", None),
        "message": message,
        "ecs.version": ECS_VERSION,
        "log.logger": str(event_dict.pop("logger", None) or "root"),
        "service.name": service_name,
        "service.version": service_version,
        "process.pid": pid,
    }
    if own:
        # Our messages are stable event names: as a keyword they can be counted and grouped.
        shaped["event.action"] = message
    _move_error(event_dict, shaped)
    _move_endpoint(event_dict, shaped)
    for key, value in event_dict.items():
        name = _field_name(key, value)
        # A caller's `message=` or `process.pid=` must not overwrite what the pipeline wrote.
        shaped[f"{NAMESPACE}.{key}" if name in shaped else name] = value
    return shaped


def _field_name(key: str, value: Any) -> str:
    if key in ECS_TYPES:
        wanted = ECS_TYPES[key]
        if isinstance(value, wanted) and not isinstance(value, bool):
            return key
    elif key.split(".", 1)[0] not in ECS_ROOTS:
        return key
    return f"{NAMESPACE}.{key}"


def _move_error(event_dict: EventDict, shaped: EventDict) -> None:
    # `error=` is the project's word for "what went wrong": in ECS that is error.message.
    error = event_dict.pop("error", None)
    for key in ("error.type", "error.message", "error.stack_trace"):
        if isinstance(event_dict.get(key), str):
            shaped[key] = event_dict.pop(key)
    if isinstance(error, str):
        shaped["error.message"] = error
    elif error is not None:
        shaped[f"{NAMESPACE}.error"] = error


def _move_endpoint(event_dict: EventDict, shaped: EventDict) -> None:
    """`host`/`port` (HTTP) and `broker="host:port"` or a broker URL (MQTT) name the server
    side; a URL is also `url.full`."""
    host, port = event_dict.pop("host", None), event_dict.pop("port", None)
    broker = event_dict.pop("broker", None)
    if host is None and isinstance(broker, str):
        if "://" in broker:  # a broker URL (endpoints.py): the scheme and path say how
            shaped["url.full"] = broker
        host, port = _split_endpoint(broker)
    elif broker is not None:
        shaped[f"{NAMESPACE}.broker"] = broker
    if isinstance(host, str):
        shaped["server.address"] = host
    elif host is not None:
        shaped[f"{NAMESPACE}.host"] = host
    if isinstance(port, int) and not isinstance(port, bool):
        shaped["server.port"] = port
    elif port is not None:
        shaped[f"{NAMESPACE}.port"] = port


def _split_endpoint(text: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port`, or a URL's `scheme://host:port/path`."""
    _, sep, rest = text.partition("://")
    if sep:
        text = rest.partition("/")[0]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text, None
    return host.removeprefix("[").removesuffix("]"), int(port)


def cap_lists(event_dict: EventDict, limit: int = LIST_LIMIT) -> EventDict:
    """A list longer than `limit` keeps its first items, then "and N more"; `<key>_count` gives
    its full length. Lists of non-strings get no marker: ES wants one type per array."""
    for key, value in list(event_dict.items()):
        if isinstance(value, list | tuple) and len(value) > limit:
            kept = list(value[:limit])
            if all(isinstance(item, str) for item in kept):
                kept.append(f"and {len(value) - limit} more")
            event_dict[key] = kept
            event_dict[f"{key}_count"] = len(value)
    return event_dict


def _dumps(data: Any) -> str:
    # ensure_ascii: one character per byte, so len() is the byte count; control characters
    # from values are escaped and cannot reach a terminal or split a line.
    try:
        return json.dumps(
            data, ensure_ascii=True, separators=(",", ":"), default=str, allow_nan=False
        )
    except ValueError:  # NaN or infinity: not JSON, and the ndjson parser would drop the line
        return _dumps(_finite(data))


def _finite(value: Any) -> Any:
    """NaN and infinities as null: a string would give the field a second type."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def render_line(event_dict: EventDict, max_chars: int = _MAX_JSON_CHARS) -> str:
    """The event as one JSON line of at most `max_chars` bytes."""
    line = _dumps(event_dict)
    if len(line) <= max_chars:
        return line
    data: dict[str, Any] = json.loads(line)  # plain JSON values, safe to edit
    line = _cut_strings(data, max_chars)
    if len(line) <= max_chars:
        return line
    return _drop_fields(data, max_chars)


def _cut_strings(data: dict[str, Any], max_chars: int) -> str:
    line = _dumps(data)
    for _ in range(64):  # each round cuts the longest string; a few rounds nearly always do
        found = _longest_string(data)
        if found is None:
            break
        container, key, text = found
        encoded = len(_dumps(text)) - 2
        excess = len(line) - max_chars + 40  # room for the marker
        keep = max(_MIN_STRING, int((encoded - excess) * len(text) / encoded))
        container[key] = _cut(text, keep)
        line = _dumps(data)
        if len(line) <= max_chars:
            break
    return line


def _cut(text: str, keep: int) -> str:
    head = keep * 2 // 3
    tail = keep - head
    return f"{text[:head]}...[{len(text) - keep} chars cut]...{text[len(text) - tail :]}"


def _longest_string(data: dict[str, Any]) -> tuple[Any, Any, str] | None:
    best: tuple[Any, Any, str] | None = None
    stack: list[tuple[Any, Any, Any]] = [
        (data, k, v) for k, v in data.items() if k not in _KEEP_WHOLE
    ]
    while stack:
        container, key, value = stack.pop()
        if isinstance(value, str):
            if len(value) > _MIN_STRING + 40 and (best is None or len(value) > len(best[2])):
                best = (container, key, value)
        elif isinstance(value, dict):
            stack.extend((value, k, v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((value, i, v) for i, v in enumerate(value))
    return best


def _drop_fields(data: dict[str, Any], max_chars: int) -> str:
    """Last resort (many small values): drop the largest optional fields and name them."""
    fixed = {*_KEEP_WHOLE, "message", "log.logger"}
    optional = sorted(
        (k for k in data if k not in fixed), key=lambda k: len(_dumps(data[k])), reverse=True
    )
    dropped: list[str] = []
    line = _dumps(data)
    for key in optional:
        del data[key]
        dropped.append(key)
        data[f"{NAMESPACE}.dropped_fields"] = dropped
        line = _dumps(data)
        if len(line) <= max_chars:
            break
    return line


def format_timestamp(epoch: float) -> str:
    """UTC ISO-8601 with milliseconds and `Z`, e.g. 2026-01-02T03:04:05.678Z."""
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
