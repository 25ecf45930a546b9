"""mqtt/faults.py: who gets the shared connection dropped, on positive evidence only."""

from __future__ import annotations

import pytest

from scheduler_publisher.mqtt.faults import RETRY_FIRST, RETRY_MAX, FaultSearch, retry_delay

PROMPT = 0.05  # a drop within this of a probe is the probe's doing


def run_search(search: FaultSearch, culprits: set[str], now: float) -> tuple[set[str], float]:
    """Drive probes to the end against a broker that drops the connection at once after a
    probe holding a culprit: what is convicted, and the time it ends at."""
    convicted: set[str] = set()
    for _ in range(100):
        probe = search.next_probe(now)
        if probe is None or probe.retry:
            search.lost()  # a retry is not part of this search
            return convicted, now
        if probe.batch & culprits:
            convicted |= search.dropped(probe.batch, "packet too large", now + 0.001, PROMPT)
        else:
            assert search.cleared() is probe
        now += 1.0
    raise AssertionError("the search did not end")


def test_drops_without_probes_never_convict_anyone() -> None:
    """A broker that keeps going away right after one entry's publish (restarts, SIGKILL):
    however many drops, the entry is only a suspect, held back until a probe clears it."""
    search = FaultSearch()
    for n in range(10):
        assert search.dropped({"only"}, "connection reset by the broker", float(n), PROMPT) == set()
    assert search.suspects() == {"only"}
    assert search.held("only")
    assert search.quarantined == {}


def test_a_probe_without_a_drop_clears_its_batch_and_the_search_ends_with_nobody() -> None:
    """After a restart that dropped a phase group, the first probe (the group alone) goes by
    without a drop: everyone is cleared at once, nobody convicted."""
    search = FaultSearch()
    group = {f"e{n}" for n in range(100)}
    search.dropped(group, "connection closed by the broker", 0.0, PROMPT)
    convicted, _ = run_search(search, set(), 1.0)
    assert convicted == set()
    assert search.suspects() == frozenset()
    assert not any(search.held(e) for e in group)


@pytest.mark.parametrize("culprit", ["e0", "e37", "e99"])
def test_a_culprit_in_a_phase_group_is_found_alone_by_halving(culprit: str) -> None:
    """A drop after a batch alone splits it; a drop after one entry alone convicts it; the
    others are cleared. About log2(group) probes."""
    search = FaultSearch()
    group = {f"e{n}" for n in range(100)}
    search.dropped(group, "packet too large", 0.0, PROMPT)
    convicted, end = run_search(search, {culprit}, 1.0)
    assert convicted == {culprit}
    assert set(search.quarantined) == {culprit}
    assert search.quarantined[culprit].reason == "packet too large"
    assert search.suspects() == frozenset()
    assert end <= 1.0 + 2 * 8, "about two probes per halving"
    assert [e for e in group if search.held(e)] == [culprit]


def test_two_culprits_in_one_group_are_both_found() -> None:
    search = FaultSearch()
    search.dropped({f"e{n}" for n in range(16)}, "packet too large", 0.0, PROMPT)
    convicted, _ = run_search(search, {"e3", "e12"}, 1.0)
    assert convicted == {"e3", "e12"}


def test_a_late_drop_after_a_probe_says_nothing() -> None:
    """The broker drops a refused packet within a few round trips; a drop long after the
    probe (a broker restart, another client) convicts nobody and the probe goes again."""
    search = FaultSearch()
    search.dropped({"a"}, "connection reset by the broker", 0.0, PROMPT)
    probe = search.next_probe(1.0)
    assert probe is not None
    assert search.dropped({"a"}, "connection reset by the broker", 1.3, PROMPT) == set()
    assert search.quarantined == {}
    again = search.next_probe(3.0)
    assert again is not None
    assert again.batch == {"a"}


def test_a_quarantined_entry_is_tried_again_alone_with_backoff_and_released() -> None:
    """Retried alone after RETRY_FIRST, doubling up to RETRY_MAX; a retry the broker takes
    releases it."""
    search = FaultSearch()
    search.dropped({"bad"}, "packet too large", 0.0, PROMPT)
    probe = search.next_probe(1.0)
    assert probe is not None
    search.dropped(probe.batch, "packet too large", 1.01, PROMPT)
    assert search.quarantined["bad"].retry_at == pytest.approx(1.01 + RETRY_FIRST)
    assert search.next_probe(1.01 + RETRY_FIRST - 1) is None  # not due yet
    assert search.next_retry() == pytest.approx(1.01 + RETRY_FIRST)
    retry = search.next_probe(20.0)
    assert retry is not None
    assert retry.retry
    assert retry.batch == {"bad"}
    search.dropped(retry.batch, "packet too large", 20.01, PROMPT)
    assert search.quarantined["bad"].convictions == 2
    assert search.quarantined["bad"].retry_at == pytest.approx(20.01 + 2 * RETRY_FIRST)
    retry = search.next_probe(100.0)
    assert retry is not None
    assert search.cleared() is retry
    assert search.quarantined == {}
    assert not search.held("bad")
    assert retry_delay(50) == RETRY_MAX


def test_an_edit_or_a_removal_forgets_the_entry() -> None:
    search = FaultSearch()
    search.dropped({"a", "b"}, "connection closed by the broker", 0.0, PROMPT)
    assert search.forget("a") is False
    assert search.suspects() == {"b"}
    search.dropped({"c"}, "x", 1.0, PROMPT)
    probe = search.next_probe(2.0)
    assert probe is not None
    search.forget("b")
    assert search.probe is None, "a probe of a forgotten entry is dropped"
    assert search.suspects() == {"c"}
