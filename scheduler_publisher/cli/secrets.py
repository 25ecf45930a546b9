"""Where the MQTT password comes from, when several places give one.

Six places can: `--password` and `--password-file` as a flag, a `SCHEDULER_PUBLISHER_*`
variable or an options-file key, and `$MQTT_PASSWORD` and the systemd credential
`mqtt-password` (`$CREDENTIALS_DIRECTORY`), which count as the environment. The password
follows every option's precedence: flag > environment and credentials > options file. Among
places of one rank the order is --password, --password-file, MQTT_PASSWORD, the credential.

A stale `password` in the options file must not beat a correct `MQTT_PASSWORD`: the service
would fail with "not authorized" while the operator's variable is right. main.py reads the
chosen place; show-options names it, and each place it beat.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from scheduler_publisher.cli.options import Origin

CREDENTIAL = "mqtt-password"
_RANK = {"flag": 3, "env": 2, "file": 1}


@dataclass(frozen=True, slots=True)
class PasswordSource:
    """One place that gives the password: the text itself, or a file whose first line it is."""

    origin: str  # for show-options: "env MQTT_PASSWORD", "file /etc/…toml: password-file", ...
    rank: int
    text: str | None = None
    path: Path | None = None
    reading: str = "--password-file"  # what a message about reading `path` calls it


def password_sources(
    args: argparse.Namespace, origins: Mapping[str, Origin], environ: Mapping[str, str]
) -> list[PasswordSource]:
    """Every place that gives a password, the one used first."""
    found: list[PasswordSource] = []
    if getattr(args, "password", None):
        origin, rank = _option(origins, "password")
        found.append(PasswordSource(origin, rank, text=str(args.password)))
    if getattr(args, "password_file", None):
        origin, rank = _option(origins, "password-file")
        found.append(PasswordSource(origin, rank, path=Path(args.password_file)))
    if environ.get("MQTT_PASSWORD"):
        found.append(PasswordSource("env MQTT_PASSWORD", _RANK["env"], environ["MQTT_PASSWORD"]))
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL).is_file():
        where = f"credential {CREDENTIAL}"
        path = Path(credentials) / CREDENTIAL
        found.append(PasswordSource(f"systemd {where}", _RANK["env"], path=path, reading=where))
    # sorted() is stable: within a rank, the order above
    return sorted(found, key=lambda source: -source.rank)


def _option(origins: Mapping[str, Origin], name: str) -> tuple[str, int]:
    """An option's origin and rank. One with no recorded origin came from the command line
    (the parser alone set it: build_settings without apply_options)."""
    origin = origins.get(name, Origin("flag", f"--{name}"))
    # "file X" alone does not say which of the two keys the options file set
    shown = f"{origin}: {name}" if origin.source == "file" and name != "password" else str(origin)
    return shown, _RANK.get(origin.source, 0)
