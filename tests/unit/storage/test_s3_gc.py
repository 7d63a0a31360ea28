"""
The bucket's gc, in memory: least recently used across the fleet first,
never what is younger than the grace period, and safe on two nodes at once.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock

from txregistry.oci.reference import Digest
from txregistry.storage.disk import DiskStorage
from txregistry.storage.runner import run_inline
from txregistry.storage.s3 import GC_GRACE, TOUCH_INTERVAL, S3Storage, access_key, object_key
from txregistry.storage.s3_client import ListedObject

HOUR = 3600.0


class FakeBucket:
    """The part of L{S3Client} gc and touches use, over a dict, on a clock."""

    endpoint = "http://bucket.test"
    bucket = "txr"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.objects: dict[str, tuple[int, float]] = {}
        self.deletes: list[str] = []
        # While set, listings wait for it: two gcs list the same bucket.
        self.hold: Deferred[None] | None = None

    def write(self, key: str, size: int) -> None:
        self.objects[key] = (size, self.clock.seconds())

    async def put_object(self, key: str, body: bytes, **_: object) -> None:
        self.write(key, len(body))

    async def list_objects(self, prefix: str) -> list[ListedObject]:
        listed = [
            ListedObject(key, size, _iso(when))
            for key, (size, when) in sorted(self.objects.items())
            if key.startswith(prefix)
        ]
        if self.hold is not None:
            await self.hold
        return listed

    async def delete_object(self, key: str) -> None:
        self.deletes.append(key)
        self.objects.pop(key, None)


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def node(tmp_path, bucket: FakeBucket, clock: Clock, name: str, limit: int) -> S3Storage:
    local = DiskStorage(tmp_path / name, 1 << 30, run_inline, now=clock.seconds)
    storage = S3Storage(
        local,
        bucket,
        "c/",
        run_inline,
        clock,
        now=clock.seconds,
        size_limit=limit,  # type: ignore[arg-type]
    )
    storage.start()
    return storage


def blob_key(n: int) -> tuple[str, str]:
    digest = str(Digest.of(b"%d" % n))
    return digest, object_key("c/", "blob", digest)


@pytest_twisted.ensureDeferred
async def test_the_least_recently_used_across_the_fleet_goes_first(tmp_path) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    bucket = FakeBucket(clock)
    a = node(tmp_path, bucket, clock, "a", limit=250)
    keys = {}
    for n in range(3):
        keys[n] = blob_key(n)
        bucket.write(keys[n][1], 100)
        clock.advance(HOUR)
    # Another node used the oldest blob since: it is recent now, for everyone.
    b = node(tmp_path, bucket, clock, "b", limit=250)
    b._touch("blob", keys[0][0])
    assert access_key("c/", "blob", keys[0][0]) in bucket.objects
    clock.advance(GC_GRACE)
    assert await a.collect_garbage() == 1
    assert keys[1][1] not in bucket.objects, "the least recently used went"
    assert keys[0][1] in bucket.objects and keys[2][1] in bucket.objects
    assert a.bucket_evictions == 1


@pytest_twisted.ensureDeferred
async def test_nothing_younger_than_the_grace_period_is_deleted(tmp_path) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    bucket = FakeBucket(clock)
    a = node(tmp_path, bucket, clock, "a", limit=100)
    for n in range(3):
        bucket.write(blob_key(n)[1], 100)
    clock.advance(GC_GRACE - 1)
    assert await a.collect_garbage() == 0, "all being written or read, as far as gc knows"
    assert len(bucket.objects) == 3
    clock.advance(1)
    assert await a.collect_garbage() == 2


@pytest_twisted.ensureDeferred
async def test_two_nodes_collecting_at_once_delete_no_more_than_one(tmp_path) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    bucket = FakeBucket(clock)
    a = node(tmp_path, bucket, clock, "a", limit=300)
    b = node(tmp_path, bucket, clock, "b", limit=300)
    for n in range(5):
        bucket.write(blob_key(n)[1], 100)
        clock.advance(60)
    clock.advance(GC_GRACE)
    bucket.hold = Deferred()
    both = DeferredList([a.collect_garbage(), b.collect_garbage()])
    # Both have listed the bucket as it was before either deleted anything.
    bucket.hold.callback(None)
    await both
    assert sorted(bucket.objects) == sorted(blob_key(n)[1] for n in (2, 3, 4))
    blob_deletes = [key for key in bucket.deletes if key.startswith("c/blobs/")]
    assert sorted(blob_deletes) == sorted(2 * [blob_key(0)[1], blob_key(1)[1]]), (
        "each deleted the same two"
    )


def test_a_node_touches_an_object_at_most_once_an_interval(tmp_path) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    bucket = FakeBucket(clock)
    a = node(tmp_path, bucket, clock, "a", limit=300)
    digest, _ = blob_key(1)
    marker = access_key("c/", "blob", digest)
    a._touch("blob", digest)
    first = bucket.objects[marker][1]
    clock.advance(TOUCH_INTERVAL - 1)
    a._touch("blob", digest)
    assert bucket.objects[marker][1] == first
    clock.advance(1)
    a._touch("blob", digest)
    assert bucket.objects[marker][1] == clock.seconds()


@pytest_twisted.ensureDeferred
async def test_pinned_content_is_never_deleted(tmp_path) -> None:
    from txregistry.storage.s3 import pin_key

    clock = Clock()
    clock.advance(1_000_000)
    bucket = FakeBucket(clock)
    a = node(tmp_path, bucket, clock, "a", limit=50)
    for n in range(3):
        bucket.write(blob_key(n)[1], 100)
        clock.advance(60)
    # The oldest was pushed to a hosted registry (by this node or another).
    await a._mark_pinned("blob", blob_key(0)[0], True)
    assert pin_key("c/", "blob", blob_key(0)[0]) in bucket.objects
    clock.advance(GC_GRACE)
    assert await a.collect_garbage() == 2
    assert blob_key(0)[1] in bucket.objects
    await a._mark_pinned("blob", blob_key(0)[0], False)
    assert await a.collect_garbage() == 1, "unpinned, it goes like the rest"
