"""PublisherService: the composition root and the one main loop.

Threads, and who owns what:
- the main loop (the thread that calls `run()`, or "service-loop" after `start()`) owns the
  running entries and their reloads (reloads.py), timers (stats, checkpoints, safety re-read,
  clock checks, systemd pings) and shutdown. Everything else only pokes it through the
  `Mailbox` (mailbox.py);
- the network thread (netloop.py) owns every paho client and also runs the scheduler
  (scheduling.LoopScheduler): each tick publishes there, with its phase group;
- the watchdog observer thread (watcher.py) and the HTTP threads (http.py) only poke or read.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from scheduler_publisher.clock import Clock, ClockGuard, SystemClock, clock_is_plausible
from scheduler_publisher.config.loader import (
    ConfigurationLoader,
    PublishConfig,
    permission_warnings,
)
from scheduler_publisher.config.shard import Shard
from scheduler_publisher.config.source import ConfigSource
from scheduler_publisher.logs.setup import get_logger
from scheduler_publisher.mailbox import Mailbox, Trigger
from scheduler_publisher.mqtt.connection import MQTTConnectionManager
from scheduler_publisher.mqtt.descriptors import DescriptorsView
from scheduler_publisher.ops.notify import SystemdNotifier
from scheduler_publisher.ops.status import (
    ConfigStatus,
    ConnectionStatus,
    DescriptorStatus,
    EntryStatus,
    HealthStatus,
    IndexCache,
    LiveEntries,
    ServiceStatus,
    StatisticsStatus,
)
from scheduler_publisher.reloads import Reloads, run_to_end
from scheduler_publisher.scheduling.scheduler import Schedule
from scheduler_publisher.scheduling.spread import PhaseSpread
from scheduler_publisher.settings import ServiceSettings
from scheduler_publisher.statestore import HistoryRow, StateStore, StateStoreError
from scheduler_publisher.stats import Stats
from scheduler_publisher.watcher import ConfigWatcher

log = get_logger("scheduler_publisher.service")

HEALTH_MAX_SILENCE = 10.0  # seconds without a heartbeat before a component counts as wedged
CLOCK_CHECK_PERIOD = 1.0
SNAPSHOT_WAIT = 1.0  # seconds the main loop waits for the network thread to copy the counters


@dataclass(slots=True)
class _Timer:
    """A periodic main-loop action."""

    period: float
    action: Callable[[], None]
    due: float


class PublisherService:
    """Publishes the entries of one config file to one MQTT broker on their schedules, and
    follows the file as it changes.

    Args:
        settings: what to read, where to publish, and how (settings.ServiceSettings); the
            defaults when None.
        clock: the time the main loop reads (clock.Clock): its timers, the watcher's debounce,
            clock-step detection and timestamps. The real clock when None; tests pass one
            they can step.

    Building it does no I/O. `start()` runs the main loop in a thread of its own, `run()` in
    the calling thread; `start(loop=False)` leaves the loop to the caller, one `step()` per
    turn. `stop()` shuts down (within `settings.shutdown_timeout`). Other threads talk to the
    running service through `request_stop()`, `request_reload()` and `reload_config()`, and
    read it through `status()`, `health_problems()` and the read-only properties.
    """

    def __init__(
        self, settings: ServiceSettings | None = None, *, clock: Clock | None = None
    ) -> None:
        self.settings = settings or ServiceSettings()
        self.stats = Stats()
        self._status_index = IndexCache()  # the entries in id order, for paged /status
        self.loader = ConfigurationLoader(
            self.settings.config_path, max_bytes=self.settings.max_config_bytes
        )
        self.notifier = SystemdNotifier()
        self.gave_up: str | None = None
        self._clock: Clock = clock or SystemClock()
        self._mail = Mailbox(self._clock.monotonic)
        self._source = ConfigSource(self.loader)
        self._connection = MQTTConnectionManager(
            self.settings.broker,
            self.stats,
            on_give_up=self._give_up,
            clear_retained_on_remove=self.settings.clear_retained_on_remove,
        )
        self._schedule = Schedule(
            self._connection.tick,
            self._connection.event_loop,
            PhaseSpread(self.settings.phase_slots),
        )
        self._watcher = ConfigWatcher(
            self.settings.config_path,
            self._mail.post_file_event,
            force_polling=self.settings.force_polling,
        )
        self._reloads = Reloads(
            self.settings,
            source=self._source,
            schedule=self._schedule,
            connection=self._connection,
            stats=self.stats,
            notifier=self.notifier,
            watcher=self._watcher,
            mail=self._mail,
            clock=self._clock,
            status_line=self._status_line,
        )
        self._store = (
            StateStore(
                self.settings.state_db,
                history_retention_rows=self.settings.history_retention_rows,
                adopt_from=self.settings.state_db_predecessor,
            )
            if self.settings.state_db
            else None
        )
        self._clock_guard = ClockGuard()
        self._timers: list[_Timer] = []
        self._loop_thread: threading.Thread | None = None
        self._loop_ident: int | None = None
        self._caller_steps = False  # start(loop=False): the caller drives the loop with step()
        self._stopped = threading.Event()
        self._started = False
        self.http: Any = None  # the HTTP server, when enabled (set by start)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self, *, loop: bool = True) -> None:
        """Load the config, schedule, connect, and run the main loop in a background thread;
        with `loop=False`, the caller runs it instead, one `step()` at a time.
        Raises ConfigFileError when the file cannot be used at all, FileInUseError
        (logs.writer_lock) when another process writes the state database, and
        StateStoreError when that cannot be opened."""
        self._startup()
        if not loop:
            self._caller_steps = True
            self._arm_timers()  # the calling thread is the main loop from here on
            return
        self._loop_thread = threading.Thread(
            target=self._main_loop, name="service-loop", daemon=True
        )
        self._loop_thread.start()

    def run(self) -> None:
        """Like start(), but the calling thread is the main loop; returns after stop()."""
        self._startup()
        self._main_loop()

    def step(self, timeout: float = 0.0) -> bool:
        """One turn of the main loop, for a service started with `start(loop=False)`: wait
        up to `timeout` seconds for a poke (less when a timer or a reload slice is due), then
        run the timers that are due and the next slice of a reload. Call it from the thread
        that called start(). Returns False, having shut the service down, once a stop was
        asked for."""
        if not self._mail.stop:
            self._wait_and_turn(timeout)
        if self._mail.stop and not self._stopped.is_set():
            self._shutdown()
        return not self._stopped.is_set()

    def stop(self) -> None:
        """Graceful stop; returns when the service has shut down (within about 5 s)."""
        self._mail.post_stop()
        if self._caller_steps:
            self.step()
        elif self._loop_thread is not None and self._loop_thread is not threading.current_thread():
            self._stopped.wait(self.settings.shutdown_timeout + 3)

    def request_stop(self) -> None:
        """Ask the main loop to stop, without waiting. Not for a signal handler itself: it
        takes the wake Event's lock, which the interrupted main thread may hold (cli/main.py hands
        it to a short-lived thread for that reason)."""
        self._mail.post_stop()

    def request_reload(self) -> None:
        """Ask the main loop to re-read the config (SIGHUP), without waiting. Like
        request_stop, it takes locks: call it from a thread, never from a signal handler."""
        self._mail.post_reload("signal")

    def reload_config(self, timeout: float = 10.0, *, trigger: Trigger = "api") -> bool:
        """Re-read the config file now; True when it was applied (fully or in part), or when
        nothing had changed. `trigger` names the caller in the log ("http", "api")."""
        request = self._mail.post_reload(trigger)
        if threading.get_ident() == self._loop_ident or not self._started:
            self._reloads.now()  # the main loop cannot wait for itself
        request.done.wait(timeout)
        return request.applied

    def _startup(self) -> None:
        self._wait_for_plausible_clock()
        result = self._source.load()  # ConfigFileError propagates: the CLI exits with code 3
        for problem in permission_warnings(self.settings.config_path):
            log.warning(
                "config_file_insecure",
                problem=problem,
                hint="anyone on this machine can change what is published",
            )
        self._restore_counters()
        run_to_end(self._reloads.apply(result, initial=True))  # no loop yet, no watchdog armed
        self._connection.connect()
        self._schedule.start()
        if self.settings.watch:
            self._watcher.start()
        self._start_http()
        self._started = True
        self.notifier.ready(self._status_line())
        log.info(
            "service_started",
            active_configs=len(self._reloads.entries),
            config=str(self.settings.config_path),
            watcher=self._watcher.kind,
            broker=self.settings.broker.brokers[0].url,
            **self._shard_fields(),
        )

    def _wait_for_plausible_clock(self) -> None:
        """Gateways without an RTC boot in 1970: never schedule against such a clock."""
        warned = False
        while not clock_is_plausible(self._clock.wall()) and not self._mail.stop:
            if not warned:
                log.warning(
                    "clock_implausible",
                    now=datetime.fromtimestamp(self._clock.wall(), UTC).isoformat(),
                )
                self.notifier.status("waiting for the system clock to be set")
                warned = True
            # Tell systemd we are alive but not ready, so TimeoutStartSec does not kill us.
            self.notifier.notify("EXTEND_TIMEOUT_USEC=5000000")
            self._mail.wake.wait(1.0)

    def _restore_counters(self) -> None:
        if self._store is None:
            return
        saved = self._store.open()  # FileInUseError: another process writes it (CLI: exit 6)
        if self._store.adopted_from is not None:
            log.info(
                "state_db_adopted",
                path=str(self._store.path),
                copied_from=str(self._store.adopted_from),
            )
        if self._store.recovered_from is not None:
            log.warning("state_db_recovered", moved_to=str(self._store.recovered_from))
        if self._store.lock_unsupported is not None:
            log.warning(
                "file_lock_unsupported",
                path=str(self._store.path),
                error=self._store.lock_unsupported,
                hint="another process could write the file too",
            )
        self.stats.restore(saved)

    def _start_http(self) -> None:
        if self.settings.http_port == 0:
            return
        from scheduler_publisher.ops.http import StatusServer  # noqa: PLC0415 - optional component

        self.http = StatusServer(self, self.settings)
        if not self.http.start():
            self.http = None

    # ---- the main loop --------------------------------------------------------------------
    def _main_loop(self) -> None:
        self._arm_timers()
        try:
            while not self._mail.stop:
                self._wait_and_turn(None)
        finally:
            self._shutdown()

    def _arm_timers(self) -> None:
        self._loop_ident = threading.get_ident()
        now = self._clock.monotonic()
        self._clock_guard.observe(self._clock.wall(), now)  # a step from here on is seen
        s = self.settings
        self._timers = [
            _Timer(period, action, now + period)
            for period, action in (
                (s.stats_interval, self._log_statistics),
                (s.checkpoint_interval, self._checkpoint),
                (s.history_interval, self._record_history),
                (s.safety_check_interval, self._safety_check),
                (CLOCK_CHECK_PERIOD, self._check_clock),
            )
        ]
        if self.notifier.watchdog_interval:
            self._timers.append(_Timer(self.notifier.watchdog_interval, self._ping_watchdog, now))

    def _wait_and_turn(self, timeout: float | None) -> None:
        wait = self._next_timeout()
        self._mail.wake.wait(wait if timeout is None else min(timeout, wait))
        self._mail.wake.clear()
        self._turn()

    def _next_timeout(self) -> float:
        if self._reloads.job is not None:
            return 0.0  # a sliced reload is under way: its next slice is due now
        due = min(t.due for t in self._timers)
        file_due = self._mail.file_event_due(self.settings.reload_debounce)
        if file_due is not None:
            due = min(due, file_due)
        return max(0.0, due - self._clock.monotonic())

    def _turn(self) -> None:
        now = self._clock.monotonic()
        for timer in self._timers:
            if now >= timer.due:
                timer.due = now + timer.period
                timer.action()
        self._reloads.turn()

    # ---- reloads (reloads.py) ---------------------------------------------------------------
    # Every reload, whoever asks (mailbox.Trigger), is a request in the mailbox. It runs as
    # steps (a generator) that the main loop advances one slice per turn, servicing its
    # timers (the systemd watchdog ping above all) and stop requests in between: a
    # 100,000-entry file takes seconds to parse and schedule (docs/design.md).
    def _safety_check(self) -> None:
        """Re-read the file in case the watcher missed an event (the digest makes it cheap)."""
        self._mail.post_reload("safety")

    def _give_up(self, reason: str) -> None:
        """Network thread: --max-retries reached. The CLI turns this into its exit code."""
        self.gave_up = reason
        log.error("mqtt_gave_up", reason=reason, max_retries=self.settings.broker.max_retries)
        self._mail.post_stop()

    # ---- timers ---------------------------------------------------------------------------
    def _log_statistics(self) -> None:
        total, up = self._connection.connection_counts()
        summary = self.stats.summary()
        log.info(
            "publisher_statistics",
            active_configs=len(self._reloads.entries),
            total_published=summary["total_published"],
            total_errors=summary["total_errors"],
            total_dropped=summary["total_dropped"],
            reconnects=summary["reconnects"],
            uptime_seconds=summary["uptime_seconds"],
            connected=self._connection.is_connected(),
            connections=total,
            connections_up=up,
            **self._shard_fields(),
        )
        self.notifier.status(self._status_line())

    def _shard_fields(self) -> dict[str, str]:
        """`shard="K/N"` for the start and statistics events of a sharded service; nothing
        otherwise, so an unsharded service logs what it always did."""
        shard = self.shard
        return {} if shard is None else {"shard": str(shard)}

    def _checkpoint(self) -> None:
        if self._store is not None:
            # The counters are copied on the network thread, their one writer, between two of
            # its turns: copied here, the main loop would hold the GIL for milliseconds at
            # thousands of entries, and a phase group due meanwhile would wait for it. The
            # write, here, lets the GIL go while SQLite works (docs/design.md, "Checkpoints
            # off the publishing path").
            state = self._connection.event_loop.call_and_wait(self.stats.saved_state, SNAPSHOT_WAIT)
            try:
                self._store.checkpoint(state, now=self._clock.wall())
            except (StateStoreError, sqlite3.Error, OSError) as exc:  # a full disk must not
                # stop publishing
                log.error("state_checkpoint_failed", error=str(exc))
                self.stats.checkpoint_failures += 1
                self.stats.checkpoint_error = str(exc)
                return
            if self.stats.checkpoint_error is not None:
                log.info("state_checkpoint_recovered", failed_before=self.stats.checkpoint_error)
                self.stats.checkpoint_error = None

    def _record_history(self) -> None:
        if self._store is not None:
            t = self.stats.totals()
            try:
                self._store.record_history(
                    HistoryRow(self._clock.wall(), t.published, t.errors, t.uptime_seconds)
                )
            except (StateStoreError, sqlite3.Error, OSError) as exc:  # never worth stopping for
                log.error("state_history_failed", error=str(exc))

    def _check_clock(self) -> None:
        jump = self._clock_guard.observe(self._clock.wall(), self._clock.monotonic())
        if jump is not None:
            self._schedule.rebuild(self._reloads.entries.values())
            # Logged once the jobs are re-anchored, so the event means "handled", not "seen".
            log.warning("clock_jump", seconds=round(jump, 3), reanchored=len(self._reloads.entries))

    def _ping_watchdog(self) -> None:
        problems = self.health_problems()
        if problems:
            log.error("watchdog_ping_withheld", problems=problems)
        else:
            self.notifier.watchdog()

    def _status_line(self) -> str:
        total, up = self._connection.connection_counts()
        state = "connected" if self._connection.is_connected() else "not connected"
        return f"{state}; {len(self._reloads.entries)} entries; {up}/{total} connections up"

    # ---- shutdown -------------------------------------------------------------------------
    def _shutdown(self) -> None:
        # Counted from the stop request, not from here: a reload slice may have been running.
        started = self._mail.stop_requested_at or time.monotonic()
        self._reloads.abandon()
        self.notifier.stopping()
        log.info("service_stopping")
        self._watcher.stop()
        self._schedule.shutdown()
        budget = self.settings.shutdown_timeout - (time.monotonic() - started)
        self._connection.disconnect(max(0.5, budget - 0.3))
        self._checkpoint()
        if self._store is not None:
            self._store.close()
        if self.http is not None:
            self.http.stop()
        log.info(
            "service_stopped",
            total_published=self.stats.totals().published,
            seconds=round(time.monotonic() - started, 3),
        )
        self._stopped.set()

    # ---- status ---------------------------------------------------------------------------
    def health_problems(self) -> list[str]:
        """Why the service is not alive and working; empty when it is. A broker outage alone is
        not a liveness problem (a restart would not fix it)."""
        problems = []
        if not self._schedule.is_alive(HEALTH_MAX_SILENCE):
            problems.append("scheduler not running")
        if self.settings.watch and not self._watcher.is_alive():
            problems.append("config watcher not running")
        if not self._connection.is_healthy(HEALTH_MAX_SILENCE):
            problems.append("network thread not running")
        return problems

    def health_warnings(self) -> list[str]:
        """What is wrong without being a liveness problem: connections that are not up (and
        which entries that leaves without one), a suspected client-id conflict, an entries
        file that cannot be used or whose entries do not all run as written."""
        warnings = self._connection.health_warnings()
        if self._reloads.last_file_problem is not None:
            warnings.append(
                f"entries file cannot be used, the entries in force run on: "
                f"{self._reloads.last_file_problem}"
            )
        if self.stats.checkpoint_error is not None:
            warnings.append(
                f"state database: the counters cannot be saved: {self.stats.checkpoint_error}"
            )
        entries = self._reloads.entry_errors.summary()
        return [*warnings, entries] if entries else warnings

    def is_connected(self) -> bool:
        return self._connection.is_connected()

    @property
    def active_configs(self) -> int:
        return len(self._reloads.entries)

    @property
    def shard(self) -> Shard | None:
        """The shard this service runs (--shard); None when it runs every entry."""
        return self.settings.shard

    @property
    def last_config_error(self) -> str | None:
        return self._reloads.last_file_problem

    @property
    def connection(self) -> MQTTConnectionManager:
        return self._connection

    @property
    def descriptors(self) -> DescriptorsView:
        """The open files limit, its reserve, and the lwt connections waiting for a
        descriptor (mqtt/descriptors.py)."""
        return self._connection.event_loop.descriptors()

    @property
    def entries(self) -> Mapping[str, PublishConfig]:
        """The running entries by id. Replaced whole on every apply, never changed in place, so
        a reader on another thread (HTTP) holds a consistent set."""
        return self._reloads.entries

    @property
    def last_applied_at(self) -> float | None:
        """Unix time the running entries were last applied (start or reload)."""
        return self._reloads.last_reload_at

    def next_run(self, entry_id: str) -> datetime | None:
        """When the entry's job runs next (UTC); None for an entry that is not scheduled."""
        return self._schedule.next_run(entry_id)

    def phase_slots(self, interval: float) -> int:
        """The phase groups per period the entries at `interval` are spread over (spread.py)."""
        return self._schedule.spread.slots(interval)

    @property
    def scheduled_ids(self) -> set[str]:
        """The ids of the entries that have a job in the scheduler."""
        return self._schedule.job_ids()

    @property
    def file_change_pending(self) -> bool:
        """The watcher saw a change that waits for its debounce before it is re-read."""
        return self._mail.file_event_pending

    def status(self) -> ServiceStatus:
        """A typed snapshot of the whole service (any thread): what GET /status serves."""
        entries = self._reloads.entries  # swapped whole, never changed in place: a consistent set
        return self._snapshot({i: self._entry_status(e) for i, e in entries.items()})

    def status_view(self) -> ServiceStatus:
        """The snapshot for one paged GET /status (any thread): everything but the entries is
        copied now; each entry's status is built when the page reads it (LiveEntries), so a
        poll of the status page builds its window, not every entry."""
        entries = LiveEntries(
            self._status_index.of(self._reloads.entries),
            self._entry_status,
            self.stats.entries,
            self._schedule.next_runs,
        )
        return self._snapshot(entries)

    def _snapshot(self, entries: Mapping[str, EntryStatus]) -> ServiceStatus:
        return ServiceStatus(
            statistics=StatisticsStatus.of(self.stats),
            connection=ConnectionStatus.of(self._connection.status()),
            health=HealthStatus(tuple(self.health_problems()), tuple(self.health_warnings())),
            config=ConfigStatus(
                path=str(self.settings.config_path),
                digest=self._source.digest,
                last_reload_at=self._reloads.last_reload_at,
                last_error=self._reloads.last_file_problem,
                watcher=self._watcher.kind,
                entry_errors=self._reloads.entry_errors,
            ),
            entries=entries,
            shard=self.shard,
            descriptors=DescriptorStatus.of(self.descriptors),
        )

    def get_status(self) -> dict[str, Any]:
        """The status snapshot as the JSON document GET /status serves."""
        return self.status().to_json()

    def _entry_status(self, entry: PublishConfig) -> EntryStatus:
        return EntryStatus.of(
            entry,
            quarantined=self._connection.quarantined(entry.id),
            next_run_at=self._schedule.next_run(entry.id),
            stats=self.stats.entries.get(entry.id),
        )
