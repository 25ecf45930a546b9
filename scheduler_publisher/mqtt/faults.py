"""Which entry gets the shared connection dropped (docs/design.md, "An entry that gets the
shared connection dropped"). Pure bookkeeping: nothing here touches the network or the clock;
the connection manager (connection.py) feeds it drops, probes and the time.

An entry is quarantined only on positive evidence: published alone on the connection (a
probe), it was followed by the broker dropping the connection. The timing of one drop among
many publishes only makes entries suspects, and a probe that goes by without a drop clears its
entries; the absence of drops never convicts anyone. A broker that simply went away (a
restart, SIGKILL) leaves suspects, which the first probe after the reconnect clears.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

RETRY_FIRST = 10.0  # seconds until a quarantined entry is tried again alone; then doubled
RETRY_MAX = 3600.0


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Why an entry is held back, and when it is next tried alone."""

    reason: str
    retry_at: float  # monotonic
    convictions: int  # lone probes it has failed in a row


@dataclass(frozen=True, slots=True)
class Probe:
    """Entries published alone on the connection, awaiting the verdict."""

    batch: frozenset[str]
    sent_at: float
    retry: bool  # a quarantined entry tried again


def retry_delay(convictions: int) -> float:
    return float(min(RETRY_MAX, RETRY_FIRST * 2.0 ** max(0, convictions - 1)))


class FaultSearch:
    """The suspects of blamed drops, as batches to publish alone; the quarantined entries.

    A drop with no probe out makes the entries published just before it one batch of
    suspects. Suspects are held back (not published) until a probe has cleared them. A probe
    sends one batch alone: no drop within the window clears the whole batch; a drop splits a
    batch in two halves, each probed in turn; a drop after one entry alone convicts it. A
    quarantined entry is probed alone again after `retry_delay`, released when the broker
    takes it."""

    def __init__(self) -> None:
        self._batches: list[frozenset[str]] = []  # suspects, the next to probe first
        self._probe: Probe | None = None
        self._quarantined: Mapping[str, Quarantine] = MappingProxyType({})  # replaced whole
        self._named = ""  # the last cause a broker's DISCONNECT named in this search

    @property
    def quarantined(self) -> Mapping[str, Quarantine]:
        """Read from any thread: a mapping that is replaced, never changed."""
        return self._quarantined

    @property
    def probe(self) -> Probe | None:
        return self._probe

    def suspects(self) -> frozenset[str]:
        return frozenset().union(*self._batches)

    def held(self, entry_id: str) -> bool:
        """Not published by its ticks: a suspect, or quarantined."""
        return entry_id in self._quarantined or any(entry_id in b for b in self._batches)

    def dropped(
        self,
        published: Iterable[str],
        reason: str,
        now: float,
        prompt: float,
        *,
        named: bool = False,
    ) -> set[str]:
        """The broker dropped the connection, naming no cause but (maybe) a packet of ours
        (`named`: its DISCONNECT named a packet fault, which a conviction then quotes, rather
        than the reset that may swallow the next one); `published`: the entries written just
        before. Returns the entries convicted. A probe's drop later than `prompt` seconds
        after it says nothing: the probe goes again on the next connection."""
        if named:
            self._named = reason
        probe, self._probe = self._probe, None
        if probe is not None and now - probe.sent_at > prompt:
            return set()
        if probe is None:
            new = frozenset(published) - self.suspects() - self._quarantined.keys()
            if new:
                self._batches.append(new)
            return set()
        if len(probe.batch) > 1:
            ordered = sorted(probe.batch)
            half = len(ordered) // 2
            self._batches[:1] = [frozenset(ordered[:half]), frozenset(ordered[half:])]
            return set()
        return self._convict(probe, reason, now)

    def lost(self) -> None:
        """The connection went for a reason that says nothing about the probe: it is sent
        again, alone, on the next connection."""
        self._probe = None

    def next_probe(self, now: float) -> Probe | None:
        """What to publish alone now (the connection is up, nothing else out), if anything:
        the next batch of suspects, or a quarantined entry whose retry is due."""
        if self._probe is not None:
            return None
        if self._batches:
            self._probe = Probe(self._batches[0], now, retry=False)
        else:
            due = sorted(i for i, q in self._quarantined.items() if q.retry_at <= now)
            if due:
                self._probe = Probe(frozenset(due[:1]), now, retry=True)
        return self._probe

    def next_retry(self) -> float | None:
        """When the next quarantined entry is due to be tried again."""
        return min((q.retry_at for q in self._quarantined.values()), default=None)

    def cleared(self) -> Probe | None:
        """The probe out went by without a drop: its entries are cleared (and a quarantined
        one released). Returns that probe."""
        probe, self._probe = self._probe, None
        if probe is None:
            return None
        if probe.retry:
            self._release(probe.batch)
        elif self._batches and self._batches[0] == probe.batch:
            del self._batches[0]
        return probe

    def forget(self, entry_id: str) -> bool:
        """An entry edited or removed: no longer suspected or quarantined. Returns whether it
        was quarantined."""
        batches = (b - {entry_id} for b in self._batches)
        self._batches = [b for b in batches if b]
        if self._probe is not None and entry_id in self._probe.batch:
            self._probe = None
        was = entry_id in self._quarantined
        self._release([entry_id])
        return was

    def _convict(self, probe: Probe, reason: str, now: float) -> set[str]:
        (entry_id,) = probe.batch
        if self._batches and self._batches[0] == probe.batch:
            del self._batches[0]
        before = self._quarantined.get(entry_id)
        convictions = 1 if before is None else before.convictions + 1
        verdict = Quarantine(self._named or reason, now + retry_delay(convictions), convictions)
        if not self._batches:
            self._named = ""
        self._quarantined = MappingProxyType({**self._quarantined, entry_id: verdict})
        return {entry_id}

    def _release(self, entry_ids: Iterable[str]) -> None:
        gone = set(entry_ids) & self._quarantined.keys()
        if gone:
            kept = {i: q for i, q in self._quarantined.items() if i not in gone}
            self._quarantined = MappingProxyType(kept)
