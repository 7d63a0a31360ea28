"""
Failover across a registry's mirrors: which to try, in what order, how a
failing one backs off, and what the client is told when none answers.

A mirror is skipped for the next one when it gives no usable answer: no
connection, no response in time, HTTP 5xx or 429, a 401 or 403, a 404
(another mirror may have it), or content that fails its digest check.  The
client gets 404 only if every mirror that answered said 404, the refusal
itself if every mirror refused the same way, and otherwise a 502 that lists
every mirror and why it failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from txregistry.config import MirrorConfig, RegistryConfig
from txregistry.upstream.errors import (
    REFUSED_CODES,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamUnavailable,
)

# A mirror backs off only once it has failed this many times in a row.
FAILURES_BEFORE_BACKOFF = 2


@dataclass(frozen=True)
class Outcome:
    """
    Why one mirror gave no usable answer.

    @ivar status: the HTTP status it answered with, or L{None} if it gave no
        answer (no connection, a timeout, bad content).
    """

    mirror: str
    reason: str
    status: int | None = None
    code: str | None = None
    message: str = ""
    retry_after: str | None = None

    @property
    def counts_as_failure(self) -> bool:
        """Whether it says the mirror is unwell, rather than that it answered."""
        return self.status is None or self.status >= 500 or self.status == 429


def conclude(registry: str, outcomes: Sequence[Outcome]) -> Exception:
    """What the client is told when no mirror gave a usable answer."""
    answered = [o for o in outcomes if o.status is not None]
    if answered and all(o.status == 404 for o in answered):
        first = answered[0]
        return UpstreamNotFound(first.code, first.message or "not found")
    first = outcomes[0]
    if first.status in REFUSED_CODES and all(o.status == first.status for o in outcomes):
        return UpstreamRefused(
            first.mirror, first.status, first.message or f"HTTP {first.status}", first.retry_after
        )
    return UpstreamUnavailable(registry, [(o.mirror, o.reason) for o in outcomes])


class MirrorState:
    """
    How one mirror has been doing.  After L{FAILURES_BEFORE_BACKOFF}
    failures in a row it is skipped for C{initial} seconds, then twice as
    long after each further failure, up to C{maximum}; any usable answer
    clears it.  Fleet peers back off from their first failure
    (C{failures_before_backoff=1}): a node that has gone is skipped at once.
    """

    def __init__(
        self,
        mirror: MirrorConfig,
        initial: float,
        maximum: float,
        failures_before_backoff: int = FAILURES_BEFORE_BACKOFF,
    ) -> None:
        self.mirror = mirror
        self._threshold = failures_before_backoff
        self._initial = initial
        self._maximum = maximum
        self.failures = 0
        self.skip_until = 0.0
        self.last_error: str | None = None
        # For metrics: every attempt, and every failed one.
        self.requests = 0
        self.failures_total = 0

    def backing_off(self, now: float) -> bool:
        return now < self.skip_until

    def usable(self, now: float) -> bool:
        """
        Whether a request to it is expected to work: it is not backing
        off, and has not failed L{FAILURES_BEFORE_BACKOFF} times in a row
        since its last usable answer.  One failure is a blip; the failures
        that made it back off count until it answers again, even once the
        backoff has run out, as nothing has shown it is back.
        """
        return self.failures < FAILURES_BEFORE_BACKOFF and not self.backing_off(now)

    def failed(self, now: float, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        if self.failures >= self._threshold:
            exponent = self.failures - self._threshold
            self.skip_until = now + min(self._initial * 2**exponent, self._maximum)

    def answered(self) -> None:
        self.failures = 0
        self.skip_until = 0.0
        self.last_error = None

    def describe(self, now: float) -> dict[str, Any]:
        """This mirror's state for C{/health}."""
        state = "backoff" if self.backing_off(now) else ("failing" if self.failures else "ok")
        description: dict[str, Any] = {
            "url": self.mirror.url,
            "resolve_tags": self.mirror.resolve_tags,
            "state": state,
            "consecutive_failures": self.failures,
        }
        if self.mirror.credentials is not None:
            description["user"] = self.mirror.credentials.username
        if self.backing_off(now):
            description["backoff_seconds"] = round(self.skip_until - now, 1)
        if self.last_error is not None:
            description["last_error"] = self.last_error
        return description


class MirrorSet:
    """The mirrors of one registry, and how each has been doing."""

    def __init__(self, registry: RegistryConfig, clock: IReactorTime) -> None:
        self._clock = clock
        upstream = registry.upstream
        self.states = [
            MirrorState(m, upstream.backoff_initial, upstream.backoff_max) for m in registry.mirrors
        ]

    def to_try(self, by_digest: bool, first: str | None = None) -> list[MirrorState]:
        """
        The mirrors to ask, in order: only those that may resolve tags
        unless the request is for content by digest, and of those, the ones
        not backing off, unless all of them are.  C{first} names a mirror to
        start from, the others following in their order (for resuming a
        download from the mirror that was sending it).
        """
        eligible = [s for s in self.states if by_digest or s.mirror.resolve_tags]
        starts = [i for i, s in enumerate(eligible) if s.mirror.url == first]
        if starts:
            eligible = eligible[starts[0] :] + eligible[: starts[0]]
        now = self._clock.seconds()
        ready = [s for s in eligible if not s.backing_off(now)]
        return ready or eligible

    def record(self, state: MirrorState, outcome: Outcome | None) -> None:
        """Note how a mirror did: L{None} for a success."""
        state.requests += 1
        if outcome is not None and outcome.counts_as_failure:
            state.failures_total += 1
            state.failed(self._clock.seconds(), outcome.reason)
        else:
            state.answered()

    def usable(self) -> bool:
        """
        Whether one of the mirrors that resolve tags is usable: without
        one, no new image can be pulled by tag, whatever the digest-only
        mirrors can do.
        """
        now = self._clock.seconds()
        return any(s.usable(now) for s in self.states if s.mirror.resolve_tags)

    def describe(self) -> list[dict[str, Any]]:
        now = self._clock.seconds()
        return [state.describe(now) for state in self.states]
