"""Which entries a shard runs: one entries file split across processes or hosts by entry id.

`--shard K/N` runs the entries whose id rendezvous-hashes to shard K of N (highest random
weight: every shard scores the id, the highest score owns it). The score is a blake2b digest
of `"<shard>:<id>"`, never Python's `hash()`, so every process and host agrees without
talking to each other. When N grows to N+1, an entry moves only if the new shard outscores
the old owner: about 1/(N+1) of the entries move, all of them to the new shard, and the
others stay where they were (docs/scaling.md).

No I/O, no clock. Scoring costs N digests per id; owners are memoised per (id, N), so a
reload re-hashes only the ids it has not seen.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, TypeVar

MAX_SHARDS: Final = 1024
EXPECTED: Final = f"K/N or K-of-N with 1 <= K <= N <= {MAX_SHARDS}"
# ASCII digits and blanks only, as every number the CLI reads (cli/options.py: Number).
_SPEC = re.compile(r"[ \t]*([0-9]{1,5})[ \t]*(?:/|-of-)[ \t]*([0-9]{1,5})[ \t]*")
# Owners already computed, by N, then by id. A plain dict rather than functools.lru_cache:
# its keys are the entries' own id strings, about 40 bytes an entry against lru_cache's 160.
# Pure memoisation, so no lock: two threads that race compute the same value.
_owners: dict[int, dict[str, int]] = {}
_OWNER_CACHE: Final = 1 << 18  # ids per N: a 100,000-entry file and its churn

_T = TypeVar("_T")


class ShardError(ValueError):
    """A shard spec that cannot be used; the message says what was expected."""


def _score(shard: int, entry_id: str) -> int:
    # surrogatepass: a JSON "\ud800" escape is a valid id (settings.entry_client_id does the same)
    key = f"{shard}:{entry_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def owner(entry_id: str, shards: int) -> int:
    """The shard (1..shards) that runs `entry_id`: the one with the highest score."""
    known = _owners.setdefault(shards, {})
    found = known.get(entry_id)
    if found is None:
        if len(known) >= _OWNER_CACHE:
            known.clear()  # ids churned past the bound: start over rather than grow
        found = known[entry_id] = max(
            range(1, shards + 1), key=lambda shard: _score(shard, entry_id)
        )
    return found


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `k` of `n` (1-based)."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n <= MAX_SHARDS:
            raise ShardError(f"must be {EXPECTED}, got {self.k}/{self.n}")

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"

    @property
    def name(self) -> str:
        """`K-of-N`: the client-id and status-topic suffix, and the systemd instance name."""
        return f"{self.k}-of-{self.n}"

    def owns(self, entry_id: str) -> bool:
        return owner(entry_id, self.n) == self.k

    def select(self, items: Iterable[_T], key: Callable[[_T], str]) -> list[_T]:
        """The items whose id (`key(item)`) this shard owns, in their order."""
        return [item for item in items if self.owns(key(item))]

    def client_id(self, base: str) -> str:
        """Each shard its own MQTT client id: two processes with one id knock each other off."""
        return f"{base}-{self.name}"

    def status_topic(self, base: str) -> str:
        """An explicit status topic made per shard (the default one follows the client id)."""
        return f"{base}/{self.name}"


def parse_shard(text: str) -> Shard:
    """`"2/3"` or `"2-of-3"` (the systemd instance name) as a Shard; raises ShardError."""
    match = _SPEC.fullmatch(text)
    if match is None:
        raise ShardError(f"must be {EXPECTED}, got {text!r}")
    k, n = int(match[1]), int(match[2])
    if not 1 <= k <= n <= MAX_SHARDS:
        raise ShardError(f"must be {EXPECTED}, got {text!r}")
    return Shard(k, n)
