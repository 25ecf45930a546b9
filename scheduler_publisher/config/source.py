"""The config file as the service sees it: has it changed since the version in force?

`ConfigSource.check()` reads the file through its `ConfigurationLoader` and answers one of
- `Unchanged`: the bytes are those of the version in force (a touch, an identical rewrite,
  the safety re-read, a file restored as it was);
- `Candidate`: a new version, parsed; it is in force only once the caller has applied it
  and said so with `applied()` (a reload cut short by a stop is not, docs/design.md);
- `Failed`: the file cannot be used at all (unreadable, too big, not an entry list).

Parsing runs as steps (config.parse_config_steps), which the main loop advances a slice at a
time. Main-loop thread only.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass

from scheduler_publisher.config.loader import (
    ConfigFileError,
    ConfigResult,
    ConfigurationLoader,
    PublishConfig,
    config_digest,
)


@dataclass(frozen=True, slots=True)
class Unchanged:
    """The file holds the version in force; `still_broken` is what that version's entry
    errors come to, in one line (None when every entry was valid)."""

    still_broken: str | None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A new version of the file, parsed, not yet applied."""

    result: ConfigResult


@dataclass(frozen=True, slots=True)
class Failed:
    """The file cannot be used at all; the entries in force keep running."""

    problem: str


Check = Unchanged | Candidate | Failed


def errors_summary(result: ConfigResult) -> str | None:
    """What is wrong with a parsed file, in one line; None when no entry was rejected."""
    errors = result.errors
    if not errors:
        return None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{errors[0]}{more}"


class ConfigSource:
    """Tells the service whether its config file changed since the version in force."""

    def __init__(self, loader: ConfigurationLoader) -> None:
        self._loader = loader
        self._digest: str | None = None
        self._errors: str | None = None  # the entry errors of the version in force

    @property
    def digest(self) -> str | None:
        """The digest of the version in force; None before the first applied()."""
        return self._digest

    def load(self) -> ConfigResult:
        """The file at start-up, parsed in one go; raises ConfigFileError."""
        return self._loader.load()

    def check(
        self,
        running: Mapping[str, PublishConfig] | None = None,
    ) -> Generator[None, None, Check]:
        """Read the file and compare it with the version in force; a new version is parsed
        in steps (the generator pauses between them). Entries of `running` whose text is
        unchanged are taken over as they are, not checked again."""
        try:
            raw = self._loader.read()
            if config_digest(raw) == self._digest:
                return Unchanged(self._errors)
            result = yield from self._loader.load_steps(raw, running)
        except ConfigFileError as exc:
            return Failed(str(exc))
        return Candidate(result)

    def applied(self, result: ConfigResult) -> None:
        """`result` is in force now: the file holding it reads as unchanged from here on."""
        self._digest = result.digest
        self._errors = errors_summary(result)
