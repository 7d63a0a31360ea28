"""
The background scrub: every blob and manifest in the cache re-hashed, over
and over, at a bounded rate, so that bytes that rot on disk (bit rot, a bad
restore, a person's mistake) are dropped and fetched again instead of being
served as hits until someone runs C{txregistry cache verify}.

It re-hashes with L{txregistry.storage.upkeep.check}, as C{cache verify}
does; every read goes through the storage's runner, off the reactor.  Its
pace is kept by the reactor's clock: at most C{rate} bytes per second,
counted in ticks of a second, and a pass over the whole cache starts at
most once every L{PASS_INTERVAL}, so that a large cache costs a steady
trickle of reads and a small one is not re-read all day.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from txregistry.oci.reference import Digest
from txregistry.storage.interface import BLOB, MANIFEST, IStorage
from txregistry.storage.runner import BlockingRunner
from txregistry.storage.upkeep import DROPPED, GONE, READ_SIZE, check

# How long after startup the first pass begins: out of the way of the
# pulls a VM makes as it boots, and of the repair after an unclean stop.
FIRST_PASS_DELAY = 300.0
# A pass over the whole cache starts at most this often (a day).
PASS_INTERVAL = 86400.0
# The rate is kept per tick of this many seconds.
TICK = 1.0


class Scrubber:
    """Re-hashes a storage's blobs and manifests, C{rate} bytes a second at most."""

    log = Logger()

    def __init__(
        self,
        storage: IStorage,
        run: BlockingRunner,
        clock: IReactorTime,
        rate: int,
        choose: random.Random | None = None,
    ) -> None:
        """
        @param choose: where in the cache each pass begins: at random, so
            that a service restarted more often than a pass takes still
            reaches every entry in time (no position is kept across restarts).
        """
        self._storage = storage
        self._choose = choose or random.Random()
        self._run = run
        self._clock = clock
        self.rate = rate
        self._per_tick = max(1, int(rate * TICK))
        self._spent = 0
        self._scrubbing: Deferred[None] | None = None
        self.state = "off" if rate == 0 else "waiting"
        self.passes = 0
        self.checked_bytes = 0
        self.checked_entries = 0
        self.dropped = 0
        self.last_pass_finished: float | None = None

    def start(self) -> None:
        if self.rate == 0 or self._scrubbing is not None:
            return
        self._scrubbing = Deferred.fromCoroutine(self._scrub())
        self._scrubbing.addErrback(self._failed)

    def stop(self) -> None:
        if self._scrubbing is not None:
            scrubbing, self._scrubbing = self._scrubbing, None
            scrubbing.cancel()

    def _failed(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return None
        self.state = "failed"
        self.log.failure("the cache scrub stopped", failure)
        return None

    async def _scrub(self) -> None:
        await deferLater(self._clock, FIRST_PASS_DELAY)
        while True:
            started = self._clock.seconds()
            await self.scrub_once()
            rest = PASS_INTERVAL - (self._clock.seconds() - started)
            self.state = "waiting"
            await deferLater(self._clock, max(rest, TICK))

    async def scrub_once(self) -> None:
        """One pass over every blob and manifest there is when it starts."""
        self.state = "scrubbing"
        checked = dropped = 0
        entries = []
        for kind in (BLOB, MANIFEST):
            entries += [(kind, name) for name in await self._storage.entries(kind)]
        if entries:
            start = self._choose.randrange(len(entries))
            entries = entries[start:] + entries[:start]
        for kind, name in entries:
            outcome = await check(
                self._storage,
                self._run,
                kind,
                Digest.parse(name),
                self._pace,
                min(READ_SIZE, self._per_tick),
            )
            if outcome is GONE:
                continue
            checked += 1
            self.checked_entries += 1
            if outcome is DROPPED:
                dropped += 1
                self.dropped += 1
        self.passes += 1
        self.last_pass_finished = self._clock.seconds()
        self.log.info(
            "cache scrub: {checked} blobs and manifests re-hashed, {dropped} corrupt and removed",
            checked=checked,
            dropped=dropped,
        )

    async def _pace(self, size: int) -> None:
        """Charge C{size} bytes to this tick, waiting for the next tick if it is spent."""
        if self._spent and self._spent + size > self._per_tick:
            await deferLater(self._clock, TICK)
            self._spent = 0
        self._spent += size
        self.checked_bytes += size

    def describe(self) -> dict[str, Any]:
        """The scrub's state, for C{/health}."""
        description: dict[str, Any] = {
            "state": self.state,
            "rate": self.rate,
            "passes": self.passes,
            "checked_bytes": self.checked_bytes,
            "corrupt_removed": self.dropped,
        }
        if self.last_pass_finished is not None:
            description["last_pass_seconds_ago"] = round(
                self._clock.seconds() - self.last_pass_finished, 1
            )
        return description
