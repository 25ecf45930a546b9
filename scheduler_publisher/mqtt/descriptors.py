"""File descriptors: the soft limit raised at start, and the budget of the lwt connections.

Every lwt entry has a connection of its own, and each holds a socket. With more lwt entries
than `ulimit -n` allows, the connections took every descriptor: HTTP could not accept, a
reload could not open the entries file, and each failed connect was retried at once
(issue 27 #8). So a connection of an lwt entry is started only while, after it, a reserve of
descriptors is still free for everything else: HTTP (a listener, four workers and a queue of
16), the entries file and its watches, the state database (the file, its WAL and index, the
lock), the log file and its lock, name lookups of the connectors. The reserve is an eighth of
the limit, at least RESERVE_MIN and at most RESERVE_MAX. The main connection is never held
back: it comes first (netloop.py) and the reserve covers it.

Counting open descriptors lists /proc/self/fd, which costs about a microsecond per
descriptor: the budget counts once, then takes one per admitted connection off what the count
left, and counts again only when fewer than the reserve are left, at most once every
RECOUNT_PERIOD. Descriptors freed meanwhile (a connection closed) are seen at that count.

Threads: a budget belongs to the network thread; `raise_soft_limit` runs once at start.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass

from scheduler_publisher.logs.setup import get_logger

__all__ = [
    "RECOUNT_PERIOD",
    "RESERVE_MAX",
    "RESERVE_MIN",
    "DescriptorBudget",
    "DescriptorsView",
    "open_descriptors",
    "open_files_limit",
    "raise_soft_limit",
    "reserve_for",
]

log = get_logger("scheduler_publisher.network")

RESERVE_MIN = 32
RESERVE_MAX = 64
RECOUNT_PERIOD = 1.0  # seconds between two counts of the open descriptors, at the most
_FD_FOLDER = "/proc/self/fd"


def reserve_for(limit: int) -> int:
    """The descriptors kept free for what is not an lwt connection, at `limit` allowed."""
    return min(RESERVE_MAX, max(RESERVE_MIN, limit // 8))


def open_files_limit() -> int | None:
    """The soft RLIMIT_NOFILE; None when it is unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int | None:
    """How many descriptors the process has open; None where /proc cannot tell."""
    try:
        # os.listdir: names only, where iterdir() would build a Path per descriptor.
        return len(os.listdir(_FD_FOLDER)) - 1  # noqa: PTH208 - less the one listdir held
    except OSError:
        return None


def raise_soft_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as most servers do at start, and log
    it: systemd's default soft limit is 1,024 while its hard limit is 524,288. Nothing is
    logged when the soft limit is the hard one already (the units set LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or (hard != resource.RLIM_INFINITY and soft > hard):
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # a seccomp filter (EPERM), an unlimited hard limit
        log.warning(
            "open_files_limit_unchanged",
            limit=soft,
            hard_limit=hard,
            error=str(exc),
            hint="lwt connections beyond the limit wait for descriptors; raise LimitNOFILE",
        )
        return
    log.info("open_files_limit_raised", before=soft, after=hard)


@dataclass(frozen=True, slots=True)
class DescriptorsView:
    """What /status and /metrics show of the budget (any thread)."""

    limit: int | None  # the soft RLIMIT_NOFILE; None: unlimited or not countable
    reserve: int
    links_waiting: int  # lwt connections due to connect that wait for a descriptor


class DescriptorBudget:
    """Admits lwt connections while the reserve stays free (see the module's docstring). The
    limit is read again at each count, so one raised while the service runs (`prlimit`) lets
    the waiting connections in within a count."""

    def __init__(
        self,
        read_limit: Callable[[], int | None] = open_files_limit,
        *,
        count: Callable[[], int | None] = open_descriptors,
    ) -> None:
        self._read_limit = read_limit
        self._count = count
        self.limit: int | None = None
        self.reserve = 0
        self._set_limit(read_limit())
        self._spare = 0  # descriptors a connection may still take, as of the last count
        self._counted_at = -math.inf

    def admit(self, now: float) -> bool:
        """One descriptor for a connection about to start, or False: it must wait."""
        if self.limit is None:
            return True
        stale = now - self._counted_at >= RECOUNT_PERIOD
        if self._spare < self.reserve and stale and not self._recount(now):
            return True
        if self._spare > 0:
            self._spare -= 1
            return True
        return False

    def refund(self) -> None:
        """Give back what `admit` gave to a connection that did not start after all."""
        if self.limit is not None:
            self._spare += 1

    def _set_limit(self, limit: int | None) -> None:
        self.limit = limit
        self.reserve = reserve_for(limit) if limit is not None else 0

    def _recount(self, now: float) -> bool:
        """Read the limit and count the open descriptors; False (and no budget from here on)
        when there is no limit or nothing to count with: no budget rather than a blind one."""
        self._set_limit(self._read_limit())
        in_use = self._count()
        self._counted_at = now
        if self.limit is None or in_use is None:
            self.limit = None
            return False
        self._spare = self.limit - self.reserve - in_use
        return True
