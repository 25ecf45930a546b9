"""Which entry gets the shared connection dropped (issue 11 #13; docs/design.md, "An entry
that gets the shared connection dropped"). Pure bookkeeping: nothing here touches the network
or the clock; the connection manager (connection.py) feeds it drops, connects and the time."""

from __future__ import annotations

from collections.abc import Callable

SUSPECT_DROPS = 5  # drops after which a few entries that cannot be told apart are all guilty
SUSPECT_GROUP = 5
SUSPECT_MEMORY = 60.0  # seconds after which an unresolved suspicion is forgotten


class FaultAttribution:
    """Which entry gets the shared connection dropped (issue 11 #13). Pure bookkeeping: each
    drop the broker blames on one of our packets names the entries published just before it;
    the culprit is in every such set, so the sets are intersected until one entry is left.

    Entries of one phase group always go out together, so intersecting alone cannot tell them
    apart. So after each drop that leaves several suspects, half of them are held back (not
    published, `held`) while the connection is up again: a drop then names only the other
    half, and a quiet spell long enough for that half to publish (`settle`) clears it, so the
    culprit is among the held. Each step halves the suspects. A few that still cannot be told
    apart after SUSPECT_DROPS drops are all guilty."""

    def __init__(self) -> None:
        self._suspects: frozenset[str] = frozenset()
        self._held: frozenset[str] = frozenset()
        self.drops = 0
        self._last = 0.0  # monotonic time of the last blamed drop (or step of the search)
        self._up_since: float | None = None  # the connection up again since, while holding
        self._quiet: float | None = None  # the quiet spell this step needs, once known

    def suspects(self, now: float) -> frozenset[str]:
        return frozenset() if self._expired(now) else self._suspects

    def held(self, now: float) -> frozenset[str]:
        """The suspects not published while the search goes on."""
        return frozenset() if self._expired(now) else self._held

    def _expired(self, now: float) -> bool:
        return now - self._last >= SUSPECT_MEMORY

    def observe(self, published: set[str], now: float) -> set[str]:
        """One blamed drop, with the entries published just before it; returns the guilty."""
        if not published:
            return set()
        if self._expired(now):
            self._forget()  # an old one-off: start over
        self._last = now
        self._suspects = frozenset(self._suspects & published or published)
        self.drops += 1
        if len(self._suspects) == 1 or (
            self.drops >= SUSPECT_DROPS and len(self._suspects) <= SUSPECT_GROUP
        ):
            return self._found(self._suspects)
        self._hold_half()
        return set()

    def link_up(self, now: float) -> None:
        """The connection is up again: the quiet spell of the held search starts now."""
        self._up_since = now if self._held else None

    def settle(self, now: float, quiet_for: Callable[[frozenset[str]], float]) -> set[str]:
        """While holding: once the connection has been up without a blamed drop for as long
        as `quiet_for` says the suspects not held need to publish (asked once a step), the
        culprit is among the held, who become the suspects; returns the guilty when one is
        left. A search that made no step for SUSPECT_MEMORY is forgotten, as `held` says."""
        if not self._held:
            return set()
        if self._expired(now):
            self._forget()  # nobody is held any more: `holding` says so too
            return set()
        if self._up_since is None:
            return set()
        if self._quiet is None:
            self._quiet = quiet_for(self._suspects - self._held)
        if now - self._up_since < self._quiet:
            return set()
        self._suspects, self._last = self._held, now
        if len(self._suspects) == 1:
            return self._found(self._suspects)
        self._hold_half(up_since=now)  # still up: the next quiet spell starts now
        return set()

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def _hold_half(self, up_since: float | None = None) -> None:
        ordered = sorted(self._suspects)
        self._held = frozenset(ordered[: len(ordered) // 2])
        self._up_since = up_since  # after a drop: from the next connect
        self._quiet = None

    def _found(self, guilty: frozenset[str]) -> set[str]:
        self._forget()
        return set(guilty)

    def _forget(self) -> None:
        self._suspects, self._held, self.drops = frozenset(), frozenset(), 0
        self._up_since = self._quiet = None
