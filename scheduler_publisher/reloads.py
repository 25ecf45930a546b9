"""What is in force, and how a new version of the config file comes into force: the steps
of a reload, from the file check to the last job scheduled (docs/design.md, "Reloads in
slices"). The main loop owns it: it starts the reloads the mailbox asks for and advances one
slice per turn, servicing its timers and stop requests in between."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TypeVar

from scheduler_publisher.clock import Clock
from scheduler_publisher.config.cron_slots import cron_slots
from scheduler_publisher.config.loader import ConfigResult, PublishConfig
from scheduler_publisher.config.source import ConfigSource, Failed, Unchanged, errors_summary
from scheduler_publisher.logs.setup import get_logger
from scheduler_publisher.mailbox import Mailbox, ReloadRequest, Trigger
from scheduler_publisher.mqtt.connection import MQTTConnectionManager
from scheduler_publisher.ops.notify import SystemdNotifier
from scheduler_publisher.ops.status import EntryErrors
from scheduler_publisher.scheduling.plan import Plan, applied, batches, diff, effective_entries
from scheduler_publisher.scheduling.scheduler import Schedule
from scheduler_publisher.scheduling.spread import period_ms
from scheduler_publisher.settings import ServiceSettings
from scheduler_publisher.stats import Stats
from scheduler_publisher.watcher import ConfigWatcher

log = get_logger("scheduler_publisher.service")  # the events' logger, as before the split

# A large reload is cut into slices of this many seconds of main-loop work; the loop's
# timers (watchdog ping, stats) and stop requests are serviced between two slices.
RELOAD_SLICE = 0.05
NETWORK_BATCH = 5000  # changed entries handed to the network thread at once
SCHEDULE_STEP = 50  # jobs added between two looks at the slice's clock

_T = TypeVar("_T")
Steps = Generator[None, None, _T]  # work that pauses (yields) where the main loop may cut it


def run_to_end(steps: Steps[_T]) -> _T:
    """Run stepped work in one go (at start-up, or when called from the loop thread)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: _T = done.value
            return result


@dataclass(slots=True)
class ReloadJob:
    """A reload under way, advanced a slice per main-loop turn; the requests it answers."""

    steps: Steps[bool]
    requests: list[ReloadRequest]


class Reloads:
    """The running entries and the reloads that replace them. Every reload, whoever asks
    (mailbox.Trigger), is a request in the mailbox; the requests pending when one starts are
    answered by it. Main loop only, but for the reads of `entries` (replaced whole, never
    changed in place) and the two fields of the config's status."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        source: ConfigSource,
        schedule: Schedule,
        connection: MQTTConnectionManager,
        stats: Stats,
        notifier: SystemdNotifier,
        watcher: ConfigWatcher,
        mail: Mailbox,
        clock: Clock,
        status_line: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.notifier = notifier
        self._source = source
        self._schedule = schedule
        self._connection = connection
        self._watcher = watcher
        self._mail = mail
        self._clock = clock
        self._status_line = status_line
        self.entries: dict[str, PublishConfig] = {}
        self.last_file_problem: str | None = None
        self.entry_errors = EntryErrors()  # of the version in force; replaced whole
        self.last_reload_at: float | None = None  # unix time of the last apply
        self.job: ReloadJob | None = None  # the reload under way
        self._broken: tuple[str, float] | None = None  # (what is wrong, since: monotonic)

    def turn(self) -> None:
        """A main-loop turn: start the next reload if none is under way, and advance it."""
        if self.job is None:
            self.job = self._next_job()
        if self.job is not None:
            self._advance(self.job)

    def now(self) -> None:
        """Answer every request so far at once, after the reload under way: the main loop
        asking for a reload cannot wait for a later turn (and two reloads at once would
        interleave their batches)."""
        if self.job is not None:
            run_to_end(self.job.steps)
            self.job = None
        run_to_end(self._answer(self._mail.take_reloads(self.settings.reload_debounce)))

    def abandon(self) -> None:
        """At shutdown: a reload cut short is not applied (the file is read afresh at the next
        start), and whoever waits for it is let go."""
        if self.job is not None:
            for request in self.job.requests:
                request.done.set()

    def _next_job(self) -> ReloadJob | None:
        """Every request so far, answered by one reload; a debounced watcher poke among them
        once the file has been quiet long enough."""
        requests = self._mail.take_reloads(self.settings.reload_debounce)
        if not requests:
            return None
        return ReloadJob(self._answer(requests), requests)

    def _answer(self, requests: list[ReloadRequest]) -> Steps[bool]:
        """One reload for `requests`, which learn whether it was applied."""
        manual = next((r.trigger for r in requests if r.manual), None)
        if any(not r.manual for r in requests):
            self._watcher.refresh()  # first: a change made while the watches move is read
        done = yield from self._reload(manual)
        for request in requests:
            request.applied = done
            request.done.set()
        return done

    def _advance(self, job: ReloadJob) -> None:
        # Real time, not the service clock: a slice bounds work, which a test clock that
        # stands still would never end.
        slice_ends = time.monotonic() + RELOAD_SLICE
        try:
            while time.monotonic() < slice_ends:
                next(job.steps)
        except StopIteration:
            self.job = None

    def _reload(self, trigger: Trigger | None) -> Steps[bool]:
        """Re-read the file. `trigger` is who asked for it when a person or program did
        (mailbox.MANUAL_TRIGGERS), None for the watcher and the safety re-read."""
        if trigger is not None:
            self.notifier.reloading()
        applied = yield from self._reload_file(trigger)
        if trigger is not None:
            self.notifier.ready(self._status_line())
        return applied

    def _reload_file(self, trigger: Trigger | None) -> Steps[bool]:
        check = yield from self._source.check(self.entries)
        if isinstance(check, Failed):
            self._file_problem(check.problem)
            return False
        self.last_file_problem = None
        if isinstance(check, Unchanged):
            # Touch, identical rewrite, the safety check, or a file restored as it was:
            # the running version's own entry errors, if any, are all that is wrong.
            self._recovered(still_broken=check.still_broken)
            if trigger is not None:
                log.info("config_unchanged", trigger=trigger, active_configs=len(self.entries))
            return True
        yield from self.apply(check.result, initial=False)
        return True

    def _file_problem(self, problem: str) -> None:
        """Keep everything running; say so once per distinct problem, not once per event."""
        self.stats.config_errors += problem != self.last_file_problem
        if problem != self.last_file_problem:
            log.error("config_reload_failed", error=problem, kept_entries=len(self.entries))
            self.last_file_problem = problem
        self._recovered(still_broken=problem)

    def _recovered(self, still_broken: str | None) -> None:
        """Track the config's broken spell: log `config_recovered` once a good version is in
        force again, with what was wrong and for how long. An operator who saw the error
        otherwise sees only silence."""
        now = self._clock.monotonic()
        if still_broken is not None:
            since = self._broken[1] if self._broken is not None else now
            self._broken = (still_broken, since)
        elif self._broken is not None:
            problem, since = self._broken
            self._broken = None
            log.info(
                "config_recovered",
                problem=problem,
                broken_seconds=round(now - since, 3),
                active_configs=len(self.entries),
            )

    def apply(self, result: ConfigResult, *, initial: bool) -> Steps[None]:
        """Bring the valid entries of `result` into force: the network thread learns them
        batch by batch, each batch before its jobs are scheduled."""
        self._log_problems(result)
        wanted, kept = effective_entries(self.entries, result, self.settings.shard)
        plan = diff(self.entries, wanted, kept)
        parts = list(batches(self._respread(plan, wanted), NETWORK_BATCH))
        for n, part in enumerate(parts, start=1):
            # Order matters: the network thread learns a batch's entries before any tick can
            # name them. The last batch hands over `wanted` itself, so entries whose metadata
            # alone changed (no batch holds them) are current too.
            self.entries = wanted if n == len(parts) else applied(self.entries, part)
            self._connection.set_entries(self.entries)
            yield from self._schedule_batch(part)
        self.entries = wanted
        if not parts:
            self._connection.set_entries(wanted)
        self._source.applied(result)  # only now: a reload cut short by a stop is not applied
        self.entry_errors = EntryErrors.of(result, kept)
        self.last_reload_at = self._clock.wall()
        if not initial:
            self.stats.reloads += 1
            self._log_reload(plan)
        self._recovered(still_broken=errors_summary(result))

    def _respread(self, plan: Plan, wanted: Mapping[str, PublishConfig]) -> Plan:
        """`plan`, plus every running entry of an interval that is spread over more phase
        groups from now on (spread.py): they are scheduled again, on their new phases."""
        respread = self._schedule.spread.size(wanted.values())
        if not respread:
            return plan
        for change in respread:
            log.warning(
                "phases_respread",
                interval=change.interval,
                entries=change.entries,
                phase_groups_before=change.slots_before,
                phase_groups=change.slots_after,
            )
        periods = {period_ms(change.interval) for change in respread}
        moving = {
            entry_id
            for entry_id, entry in wanted.items()
            if entry_id in self.entries
            and entry.interval is not None
            and period_ms(entry.interval) in periods
        }
        moving -= {entry.id for entry in (*plan.added, *plan.rescheduled)}
        return replace(
            plan,
            rescheduled=(*plan.rescheduled, *(e for i, e in wanted.items() if i in moving)),
            updated=tuple(entry for entry in plan.updated if entry.id not in moving),
        )

    def _schedule_batch(self, part: Plan) -> Steps[None]:
        for entry in part.removed:
            self._schedule.remove(entry.id)
        for n, entry in enumerate((*part.added, *part.rescheduled), start=1):
            self._schedule.add(entry)  # ~0.1 ms each in APScheduler 3: pause now and then
            if entry.cron is not None:
                self._log_cron(entry)
            if n % SCHEDULE_STEP == 0:
                yield

    def _log_cron(self, entry: PublishConfig) -> None:
        # The next slot shows how CronTrigger read the expression (weekdays, time zone): the
        # line to look at when a cron entry fires at an unexpected time.
        assert entry.cron is not None
        now = datetime.fromtimestamp(self._clock.wall(), UTC)
        slots = cron_slots(entry.cron, entry.timezone)
        following = slots.slot_after(now)
        log.info(
            "cron_scheduled",
            entry_id=entry.id,
            cron=entry.cron,
            timezone=entry.timezone,
            next_run_at=slots.local(following).isoformat() if following else None,
        )

    def _log_problems(self, result: ConfigResult) -> None:
        self.stats.config_errors += len(result.errors)
        for problem in result.problems:
            emit = log.error if problem.severity == "error" else log.warning
            emit(
                "config_entry_invalid" if problem.severity == "error" else "config_entry_warning",
                error=str(problem),
                entry_position=problem.position,
                entry_id=problem.entry_id,
                field=problem.field,
                line=problem.line,
                column=problem.column,
            )

    def _log_reload(self, plan: Plan) -> None:
        log.info("config_reloaded", active_configs=len(self.entries), **plan.summary())
