"""The mailbox: every reload request with its trigger, the watcher's debounce (pure)."""

from __future__ import annotations

from scheduler_publisher.mailbox import Debounce, Mailbox, Trigger

DEBOUNCE = Debounce(quiet=0.3, write_ended=0.05)


class Now:
    """A monotonic clock the test sets."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def pending(mail: Mailbox) -> bool:
    """Read afresh each time (mypy would otherwise keep an earlier assert's narrowing)."""
    return mail.file_event_pending


def test_requests_are_taken_once_with_their_triggers() -> None:
    """Every posted request comes out once, in order; only people and programs are manual."""
    mail = Mailbox(Now())
    triggers: tuple[Trigger, ...] = ("signal", "http", "api", "safety")
    for trigger in triggers:
        mail.post_reload(trigger)
    taken = mail.take_reloads(DEBOUNCE)
    assert [(r.trigger, r.manual) for r in taken] == [
        ("signal", True),
        ("http", True),
        ("api", True),
        ("safety", False),
    ]
    assert mail.take_reloads(DEBOUNCE) == []
    assert mail.wake.is_set()


def test_a_watcher_poke_becomes_a_reload_only_after_the_debounce() -> None:
    """A poke waits out the debounce on the given clock, and a later poke restarts it."""
    now = Now()
    mail = Mailbox(now)
    mail.post_file_event()
    assert pending(mail)
    assert mail.file_event_due(DEBOUNCE) == 100.0 + DEBOUNCE.quiet
    now.t += 0.2
    assert mail.take_reloads(DEBOUNCE) == []
    mail.post_file_event()  # the editor writes again: quiet for another debounce from here
    now.t += 0.2
    assert mail.take_reloads(DEBOUNCE) == []
    now.t += 0.1
    (request,) = mail.take_reloads(DEBOUNCE)
    assert (request.trigger, request.manual) == ("watcher", False)
    assert not pending(mail)
    assert mail.file_event_due(DEBOUNCE) is None


def test_a_poke_that_ends_a_write_is_due_sooner_until_another_change_comes() -> None:
    """After a change that ends a write (closed after writing, renamed into place) the short
    debounce is enough; any later poke restarts the wait with its own kind."""
    now = Now()
    mail = Mailbox(now)
    mail.post_file_event(write_ended=True)
    assert mail.file_event_due(DEBOUNCE) == 100.0 + DEBOUNCE.write_ended
    mail.post_file_event()  # e.g. a chmod right after the save: it may be one of several
    now.t += DEBOUNCE.write_ended
    assert mail.take_reloads(DEBOUNCE) == []
    assert mail.file_event_due(DEBOUNCE) == 100.0 + DEBOUNCE.quiet
    mail.post_file_event(write_ended=True)  # ... and the save that ends it
    assert mail.take_reloads(DEBOUNCE) == []
    now.t += DEBOUNCE.write_ended
    (request,) = mail.take_reloads(DEBOUNCE)
    assert request.trigger == "watcher"
    assert not pending(mail)


def test_stop_is_remembered_from_the_first_request() -> None:
    """A second stop request does not move the time the first one was made."""
    mail = Mailbox(Now())
    mail.post_stop()
    first = mail.stop_requested_at
    mail.post_stop()
    assert mail.stop
    assert first is not None
    assert mail.stop_requested_at == first
