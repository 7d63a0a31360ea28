"""
File descriptors: the soft limit raised towards the hard one at startup, and
running out of them reported once per interval instead of once per failed
C{accept}.

Each connection costs a descriptor, so a flood of clients (or of half-sent
requests) can use them all; systemd gives a service a soft limit of 1024 by
default.  Go servers raise their soft limit to the hard limit by
themselves, and nginx has C{worker_rlimit_nofile}: txregistry does the same.

When they run out anyway, Twisted's C{tcp.Port.doRead} logs an event for
every failed C{accept} (C{Could not accept new connection (EMFILE)}, and
C{EMFILE recovery: Closed socket from ...} for each client it turns away
with its reserved descriptor): over a thousand lines in seconds, which bury
everything else and trip the journal's rate limit.  L{ExhaustionReporter}
takes the place of the port's logger, on our own listening ports only: it
counts those events and says C{out of file descriptors ...} at most once
per L{REPORT_INTERVAL}, with the count, and passes every other event on.
Replacing the logger of a port (rather than filtering the global log) keeps
the filter to txregistry's listeners, needs no copy of C{doRead}, and works
for plain and TLS ports alike, whose classes share it.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from zope.interface import implementer

# A report of exhaustion is made at most this often.
REPORT_INTERVAL = 60.0
# /health says degraded for this long after descriptors last ran out.
RECENT = 300.0
# The events Twisted's accept loop logs when it cannot accept (tcp._accept),
# and whether each stands for a connection that was not served.
_ACCEPT_FAILURES = {
    "Could not accept new connection ({acceptError})": True,
    "EMFILE recovery: Closed socket from {address}": True,
    "EMFILE encountered; releasing reserved file descriptor.": False,
    "Re-reserving EMFILE recovery file descriptor.": False,
}
# A select()-based reactor cannot watch a descriptor above FD_SETSIZE.
SELECT_LIMIT = 1024

log = Logger(namespace="txregistry.ops.files")


@dataclass
class FileDescriptors:
    """The process's descriptor limits and how often they were reached, for /health and metrics."""

    soft_limit: int = 0
    hard_limit: int = 0
    refused_total: int = 0
    last_exhausted: float | None = None
    clock: IReactorTime | None = field(default=None, repr=False)

    def in_use(self) -> int | None:
        """How many descriptors are open now, or None if that cannot be told (none left)."""
        try:
            # Less the one listdir itself holds open.
            return len(os.listdir("/proc/self/fd")) - 1
        except OSError:
            return None

    def exhausted_recently(self) -> bool:
        return (
            self.last_exhausted is not None
            and self.clock is not None
            and self.clock.seconds() - self.last_exhausted < RECENT
        )

    def describe(self) -> dict[str, Any]:
        description: dict[str, Any] = {
            "soft_limit": self.soft_limit,
            "hard_limit": self.hard_limit,
            "open": self.in_use(),
            "refused_total": self.refused_total,
        }
        if self.last_exhausted is not None and self.clock is not None:
            description["exhausted_seconds_ago"] = round(
                self.clock.seconds() - self.last_exhausted, 1
            )
        return description


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def raise_soft_limit(files: FileDescriptors, ceiling: int | None = None) -> None:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit (or C{ceiling}, for a
    reactor that cannot use more), record both in C{files} and log the result.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if ceiling is not None and (target == resource.RLIM_INFINITY or target > ceiling):
        target = ceiling
    files.soft_limit, files.hard_limit = soft, hard
    if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or soft < target):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn(
                "file descriptors: cannot raise the soft limit from {soft} to {target}: {error};"
                " staying at {soft}",
                soft=soft,
                target=_limit_text(target),
                error=str(e),
            )
            return
        files.soft_limit = target
        log.info(
            "file descriptors: soft limit raised from {soft} to {target}",
            soft=soft,
            target=_limit_text(target),
        )
        return
    why = (
        "the most this reactor can use"
        if ceiling is not None and target == ceiling and soft >= ceiling
        else "the hard limit; raise LimitNOFILE= in the unit to allow more"
    )
    log.info("file descriptors: soft limit {soft}, {why}", soft=_limit_text(soft), why=why)


@implementer(ILogObserver)
class ExhaustionReporter:
    """
    The logger's observer for our listening ports: accept failures are
    counted and reported once per interval; everything else goes on to
    C{forward}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        files: FileDescriptors,
        forward: ILogObserver = globalLogPublisher,
        interval: float = REPORT_INTERVAL,
    ) -> None:
        self._clock = clock
        self._files = files
        self._forward = forward
        self._interval = interval
        self._unreported = 0
        self._next_report: IDelayedCall | None = None

    def __call__(self, event: LogEvent) -> None:
        refused = _ACCEPT_FAILURES.get(event.get("log_format", ""))
        if refused is None:
            self._forward(event)
            return
        self._files.last_exhausted = self._clock.seconds()
        if not refused:
            return
        self._files.refused_total += 1
        self._unreported += 1
        if self._next_report is None:
            # The first in an interval is said at once; the rest at its end.
            self._report()

    def _report(self) -> None:
        self._next_report = None
        if not self._unreported:
            return
        count, self._unreported = self._unreported, 0
        in_use = self._files.in_use()
        log.error(
            "out of file descriptors: {count} connections could not be accepted"
            "{since} (soft limit {limit}, {in_use} open); raise LimitNOFILE=, or find"
            " the clients holding connections open",
            count=count,
            since=" since the last report" if self._files.refused_total > count else "",
            limit=_limit_text(self._files.soft_limit),
            in_use="all" if in_use is None else in_use,
        )
        self._next_report = self._clock.callLater(self._interval, self._report)

    def stop(self) -> None:
        if self._next_report is not None and self._next_report.active():
            self._next_report.cancel()
        self._next_report = None

    def watch(self, port: IListeningPort) -> bool:
        """
        Take the place of C{port}'s logger (Twisted's C{tcp.Port._logger},
        which its accept loop logs to); whether the port has one.
        """
        logger = getattr(port, "_logger", None)
        if not isinstance(logger, Logger):
            return False
        port._logger = Logger(namespace=logger.namespace, observer=self)  # type: ignore[attr-defined]
        return True
