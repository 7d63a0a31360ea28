"""
The background scrub over a real disk store, with the clock in the test's
hands: what rotted is found and dropped, at a bounded rate, and content of
the wrong size or digest is never served.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from test_contract import fired as result
from test_contract import read_all_now as read_all
from test_contract import store_blob_now as store_blob
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from txregistry.oci.reference import Digest
from txregistry.storage import upkeep
from txregistry.storage.disk import DiskStorage
from txregistry.storage.interface import StoredManifest
from txregistry.storage.runner import run_inline
from txregistry.storage.scrub import FIRST_PASS_DELAY, PASS_INTERVAL, TICK, Scrubber


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_000_000)
    return clock


@pytest.fixture
def storage(tmp_path: Path, clock: Clock):
    storage = DiskStorage(tmp_path / "cache", 1 << 30, run_inline, now=clock.seconds)
    storage.start()
    yield storage
    storage.stop()


def file_of(storage: DiskStorage, digest: Digest) -> Path:
    return Path(storage._where(storage._cache, f"blob/{digest}"))


def rot(path: Path) -> None:
    """Flip one byte in the middle, keeping the size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class CountingRunner:
    """Runs inline, and counts the bytes the scrub asks to read."""

    def __init__(self) -> None:
        self.read = 0

    def __call__(self, f, *args):
        if f is upkeep._hash_range:
            self.read += args[3]
        return run_inline(f, *args)


def scrub_until_done(clock: Clock, scrubber: Scrubber, passes: int = 1) -> int:
    """Advance tick by tick until C{passes} passes are done; how many ticks it took."""
    clock.advance(FIRST_PASS_DELAY)
    ticks = 0
    while scrubber.passes < passes:
        assert ticks < 10_000, "the scrub never finished a pass"
        clock.advance(TICK)
        ticks += 1
    return ticks


def test_the_scrub_drops_a_blob_that_rotted_and_keeps_the_rest(storage, clock, logs):
    sound = [store_blob(storage, os.urandom(300_000)) for _ in range(2)]
    rotten = store_blob(storage, os.urandom(300_000))
    path = file_of(storage, rotten)
    rot(path)
    scrubber = Scrubber(storage, run_inline, clock, rate=1 << 20)
    scrubber.start()
    scrub_until_done(clock, scrubber)

    assert read_all(storage, rotten) is None
    assert not path.exists()
    assert all(read_all(storage, d) is not None for d in sound)
    (line,) = logs.matching("removed corrupt cache blob")
    assert str(rotten) in line and str(path) in line and "hash to sha256:" in line
    assert logs.matching("cache scrub: 3 blobs and manifests re-hashed, 1 corrupt and removed")
    assert (scrubber.dropped, storage.corrupt_removed) == (1, 1)
    result(storage.update_figures())
    assert storage.figures.corrupt_removed == 1, "kept with the cache, for cache stats"
    health = scrubber.describe()
    assert health["passes"] == 1 and health["corrupt_removed"] == 1
    assert health["checked_bytes"] == 900_000
    scrubber.stop()
    assert not clock.getDelayedCalls()


def test_the_scrub_reads_at_most_its_rate_per_tick(storage, clock):
    for _ in range(3):
        store_blob(storage, os.urandom(100_000))
    runner = CountingRunner()
    rate = 64 << 10
    scrubber = Scrubber(storage, runner, clock, rate=rate)
    scrubber.start()
    clock.advance(FIRST_PASS_DELAY)
    per_tick = []
    while scrubber.passes < 1:
        before = runner.read
        clock.advance(TICK)
        per_tick.append(runner.read - before)
        assert len(per_tick) < 100
    assert runner.read == 300_000
    assert max(per_tick) <= rate * TICK
    assert len(per_tick) >= 300_000 // rate, "the pass is spread over ticks"
    scrubber.stop()


def test_passes_start_at_most_once_per_interval(storage, clock):
    store_blob(storage, b"a" * 1000)
    scrubber = Scrubber(storage, run_inline, clock, rate=1 << 20)
    scrubber.start()
    scrub_until_done(clock, scrubber)
    clock.advance(PASS_INTERVAL / 2)
    assert scrubber.passes == 1
    clock.advance(PASS_INTERVAL / 2)
    assert scrubber.passes == 2
    assert scrubber.describe()["state"] == "waiting"
    scrubber.stop()
    assert not clock.getDelayedCalls()


def test_the_scrub_does_not_change_the_order_of_eviction(storage, clock):
    older = store_blob(storage, b"o" * 1000)
    clock.advance(60)
    store_blob(storage, b"n" * 1000)
    scrubber = Scrubber(storage, run_inline, clock, rate=1 << 20)
    scrubber.start()
    scrub_until_done(clock, scrubber)
    assert storage._index.least_recently_used() == f"blob/{older}"
    scrubber.stop()


def test_a_rate_of_zero_turns_the_scrub_off(storage, clock):
    scrubber = Scrubber(storage, run_inline, clock, rate=0)
    scrubber.start()
    assert not clock.getDelayedCalls()
    assert scrubber.describe()["state"] == "off"


def test_a_blob_of_the_wrong_size_is_never_served(storage, logs):
    shorter = store_blob(storage, b"s" * 5000)
    longer = store_blob(storage, b"l" * 5000)
    file_of(storage, shorter).write_bytes(b"s" * 4999)
    file_of(storage, longer).write_bytes(b"l" * 5001)
    assert read_all(storage, shorter) is None
    assert read_all(storage, longer) is None
    assert storage.corrupt_removed == 2
    assert logs.matching("holds 4999 bytes, not the 5000 it was stored with")
    assert result(storage.entries("blob")) == []


def test_a_manifest_that_does_not_match_its_digest_is_never_served(storage, logs):
    digest = Digest.of(b'{"schemaVersion": 2}')
    # What rot would leave: the entry's bytes no longer hash to its name.
    assert result(storage.put_manifest(digest, StoredManifest("t", b'{"schemaVersion": 3}')))
    assert result(storage.get_manifest(digest)) is None
    assert result(storage.entries("manifest")) == []
    assert storage.corrupt_removed == 1
    (line,) = logs.matching("removed corrupt cache manifest")
    assert str(digest) in line and "do not match its digest" in line and "cache.db" in line


def test_the_scrub_drops_a_rotten_manifest(storage, clock):
    good = b'{"good": true}'
    assert result(storage.put_manifest(Digest.of(good), StoredManifest("t", good)))
    bad = Digest.of(b"was")
    assert result(storage.put_manifest(bad, StoredManifest("t", b"now")))
    scrubber = Scrubber(storage, run_inline, clock, rate=1 << 20)
    scrubber.start()
    scrub_until_done(clock, scrubber)
    assert scrubber.dropped == 1
    assert result(storage.entries("manifest")) == [str(Digest.of(good))]
    scrubber.stop()


def test_verify_lists_what_the_storage_dropped_on_reading(storage):
    bad = Digest.of(b"was")
    assert result(storage.put_manifest(bad, StoredManifest("t", b"now")))
    short = store_blob(storage, b"x" * 100)
    file_of(storage, short).write_bytes(b"x" * 10)
    checked, removed = result(Deferred.fromCoroutine(upkeep.verify(storage)))
    assert (checked, sorted(removed)) == (2, sorted([f"blob/{short}", f"manifest/{bad}"]))


def test_each_pass_begins_somewhere_else(storage, clock):
    """So that a service restarted more often than a pass takes still reaches every entry."""
    by_first_byte = {i: str(store_blob(storage, bytes([i]) * 1000)) for i in range(5)}
    order: list[str] = []

    def recording(f, *args):
        if f is upkeep._hash_range and args[2] == 0:
            order.append(by_first_byte[args[0].read(0, 1)[0]])
        return run_inline(f, *args)

    firsts = set()
    for seed in range(20):
        order.clear()
        scrubber = Scrubber(storage, recording, clock, rate=1 << 20, choose=random.Random(seed))
        result(Deferred.fromCoroutine(scrubber.scrub_once()))
        assert sorted(order) == sorted(by_first_byte.values()), "every entry, once"
        firsts.add(order[0])
    assert len(firsts) > 1
