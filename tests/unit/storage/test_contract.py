"""
The storage contract: what every backend must do, run against each one.

A new backend proves itself by being added to L{BACKENDS}: the repository
and HTTP layers rely on nothing that is not tested here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from txregistry.oci.reference import Digest
from txregistry.storage import upkeep
from txregistry.storage.disk import DiskStorage
from txregistry.storage.interface import (
    BLOB,
    MANIFEST,
    TAG,
    IStagedBlob,
    IStorage,
    StoredManifest,
    TagEntry,
)
from txregistry.storage.runner import run_inline

Factory = Callable[[int], IStorage]


def disk(tmp_path: Path, clock: Clock) -> Factory:
    def make(size_limit: int) -> IStorage:
        return DiskStorage(tmp_path / "cache", size_limit, run_inline, now=clock.seconds)

    return make


def s3(tmp_path: Path, clock: Clock) -> Factory:
    """
    The S3 backend on the real Swift (started once per session), each test
    under a prefix of its own in the one bucket.  Bucket requests run on the
    real reactor; the local tier's index uses the test's clock.
    """
    from harness.swift import ACCESS_KEY, BUCKET, REGION, SECRET_KEY
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    from txregistry.config import Secret
    from txregistry.storage.s3 import S3Storage
    from txregistry.storage.s3_client import S3Client

    endpoint = _swift_endpoint()
    prefix = f"contract-{os.urandom(6).hex()}/"

    def make(size_limit: int) -> IStorage:
        local = DiskStorage(tmp_path / "cache", size_limit, run_inline, now=clock.seconds)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        client = S3Client(
            agent, reactor, endpoint, BUCKET, REGION, True, Secret(ACCESS_KEY), Secret(SECRET_KEY)
        )
        return S3Storage(local, client, prefix, run_inline, reactor, now=clock.seconds)

    return make


_swift_endpoint: Callable[[], str]

BACKENDS = {"disk": disk, "s3": s3}
# What only the disk does: the S3 backend's local tier evicts as the disk
# does, but what it evicts is still in the bucket, which has a limit of its own.
LOCAL_EVICTION = {"disk"}


@pytest.fixture(autouse=True)
def _endpoint(request: pytest.FixtureRequest) -> None:
    global _swift_endpoint
    if "make" in request.fixturenames and getattr(request.node, "callspec", None):
        if request.node.callspec.params.get("make") == "s3":
            swift = request.getfixturevalue("swift")
            _swift_endpoint = lambda: swift.endpoint  # noqa: E731


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_000_000)
    return clock


@pytest.fixture(params=sorted(BACKENDS))
def make(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Factory]:
    """Makes started backends of one kind over the same place, and stops them after."""
    started: list[IStorage] = []

    def start(size_limit: int = 1 << 30) -> IStorage:
        storage = BACKENDS[request.param](tmp_path, clock)(size_limit)
        storage.start()
        started.append(storage)
        return storage

    start.backend = request.param  # type: ignore[attr-defined]
    yield start
    for storage in started:
        pytest_twisted.blockon(Deferred.fromCoroutine(settle(storage)))
        storage.stop()


async def result(d: Deferred[object] | object) -> object:
    """
    The result of a Deferred: the disk's has fired (its runner is inline);
    the S3 backend's waits for the bucket, on the running reactor.
    """
    if isinstance(d, Deferred):
        return await d
    return d


def fired(d: Deferred[object] | object) -> object:
    """The result of a Deferred that has fired: the disk's, whose runner is inline."""
    if not isinstance(d, Deferred):
        return d
    results: list[object] = []
    d.addBoth(results.append)
    (value,) = results
    return value


def store_blob_now(storage: IStorage, data: bytes, pinned: bool = False) -> Digest:
    """L{store_blob} on the disk, whose every call has fired when it returns."""
    return fired(Deferred.fromCoroutine(store_blob(storage, data, pinned)))  # type: ignore[return-value]


def read_all_now(storage: IStorage, digest: Digest) -> bytes | None:
    return fired(Deferred.fromCoroutine(read_all(storage, digest)))  # type: ignore[return-value]


async def settle(storage: IStorage) -> None:
    """Wait for the uploads into the bucket that commits started in the background."""
    for upload in list(getattr(storage, "uploads", ())):
        await upload.done


async def store_blob(storage: IStorage, data: bytes, pinned: bool = False) -> Digest:
    digest = Digest.of(data)
    staged = storage.stage_blob(digest)
    staged.append(data)
    assert await result(staged.seal()) == digest.hex
    assert await result(staged.commit(digest, len(data), pinned)) is True
    staged.close()
    await settle(storage)
    return digest


async def read_all(storage: IStorage, digest: Digest) -> bytes | None:
    blob = await result(storage.open_blob(digest))
    if blob is None:
        return None
    try:
        return blob.source.read(0, blob.size)  # type: ignore[attr-defined, no-any-return]
    finally:
        blob.source.release()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_it_provides_the_interfaces(make: Factory) -> None:
    storage = make()
    assert verifyObject(IStorage, storage)
    staged = storage.stage_blob(Digest.of(b"x"))
    assert verifyObject(IStagedBlob, staged)
    staged.abort()
    staged.close()
    assert storage.status == "ok"


@pytest_twisted.ensureDeferred
async def test_a_committed_blob_is_served_whole(make: Factory) -> None:
    storage = make()
    data = os.urandom(300_000)
    digest = await store_blob(storage, data)
    blob = await result(storage.open_blob(digest))
    assert blob.size == len(data)  # type: ignore[attr-defined]
    source = blob.source  # type: ignore[attr-defined]
    assert source.is_complete() and source.available() == len(data)
    assert source.read(1000, 10) == data[1000:1010]
    source.release()


@pytest_twisted.ensureDeferred
async def test_staged_bytes_can_be_read_back_before_the_commit(make: Factory) -> None:
    storage = make()
    staged = storage.stage_blob(Digest.of(b"abcdef"))
    staged.append(b"abc")
    staged.append(b"def")
    assert staged.written == 6
    assert staged.read(2, 3) == b"cde"
    staged.abort()
    staged.close()


@pytest_twisted.ensureDeferred
async def test_an_aborted_blob_is_never_stored(make: Factory) -> None:
    storage = make()
    digest = Digest.of(b"never")
    staged = storage.stage_blob(digest)
    staged.append(b"never")
    staged.abort()
    staged.close()
    assert await result(storage.open_blob(digest)) is None
    assert await result(storage.entries(BLOB)) == []


@pytest_twisted.ensureDeferred
async def test_a_blob_cannot_be_committed_under_another_digest(make: Factory) -> None:
    storage = make()
    staged = storage.stage_blob(Digest.of(b"one"))
    staged.append(b"one")
    await result(staged.seal())
    with pytest.raises(AssertionError):
        staged.commit(Digest.of(b"two"), 3)
    staged.abort()
    staged.close()
    assert await result(storage.open_blob(Digest.of(b"two"))) is None


@pytest_twisted.ensureDeferred
async def test_missing_content_is_none(make: Factory) -> None:
    storage = make()
    assert await result(storage.open_blob(Digest.of(b"nothing"))) is None
    assert await result(storage.get_manifest(Digest.of(b"nothing"))) is None
    assert await result(storage.get_tag("docker.io/library/a:1#x")) is None


@pytest_twisted.ensureDeferred
async def test_manifests_and_tags(make: Factory) -> None:
    storage = make()
    body = b'{"schemaVersion": 2}'
    digest = Digest.of(body)
    assert await result(storage.put_manifest(digest, StoredManifest("application/x.test", body)))
    assert await result(storage.get_manifest(digest)) == StoredManifest("application/x.test", body)
    entry = TagEntry(str(digest), "application/x.test", len(body), 1234.5)
    assert await result(storage.put_tag("docker.io/library/a:1#x", entry))
    assert await result(storage.get_tag("docker.io/library/a:1#x")) == entry
    assert await result(storage.get_tag("docker.io/library/a:2#x")) is None


@pytest_twisted.ensureDeferred
async def test_everything_survives_a_restart(make: Factory) -> None:
    storage = make()
    digest = await store_blob(storage, b"persistent")
    await result(storage.put_manifest(digest, StoredManifest("t", b"persistent")))
    await result(storage.put_tag("r/a:1#x", TagEntry(str(digest), "t", 1, 5.0)))
    storage.stop()
    again = make()
    assert await read_all(again, digest) == b"persistent"
    assert await result(again.get_manifest(digest)) == StoredManifest("t", b"persistent")
    assert await result(again.get_tag("r/a:1#x")) == TagEntry(str(digest), "t", 1, 5.0)


@pytest_twisted.ensureDeferred
async def test_the_least_recently_used_goes_first_one_at_a_time(
    make: Factory, clock: Clock
) -> None:
    if make.backend not in LOCAL_EVICTION:  # type: ignore[attr-defined]
        pytest.skip("the local tier's eviction; what it evicts stays in the bucket")
    storage = make(250_000)
    a = await store_blob(storage, os.urandom(100_000))
    clock.advance(10)
    b = await store_blob(storage, os.urandom(100_000))
    clock.advance(10)
    assert await read_all(storage, a) is not None  # a is used again
    clock.advance(10)
    c = await store_blob(storage, os.urandom(100_000))
    assert [await read_all(storage, d) is not None for d in (a, b, c)] == [True, False, True]
    assert storage.evictions == 1


@pytest_twisted.ensureDeferred
async def test_pinned_content_is_never_evicted_and_counted_apart(
    make: Factory, clock: Clock
) -> None:
    if make.backend not in LOCAL_EVICTION:  # type: ignore[attr-defined]
        pytest.skip("the local tier's eviction; what it evicts stays in the bucket")
    storage = make(250_000)
    pinned = await store_blob(storage, os.urandom(100_000), pinned=True)
    body = b"m" * 1000
    manifest = Digest.of(body)
    await result(storage.put_manifest(manifest, StoredManifest("t", body), pinned=True))
    for _ in range(4):
        clock.advance(10)
        await store_blob(storage, os.urandom(100_000))
    assert await read_all(storage, pinned) is not None
    assert await result(storage.get_manifest(manifest)) is not None
    await result(storage.update_figures())
    figures = storage.figures
    assert (figures.pinned_entries, figures.pinned_size) == (2, 101_000)
    assert figures.size <= 250_000
    # Unpinned, it is the oldest, and goes first.
    assert await result(storage.pin(BLOB, str(pinned), False)) is True
    clock.advance(10)
    await store_blob(storage, os.urandom(100_000))
    assert await read_all(storage, pinned) is None


@pytest_twisted.ensureDeferred
async def test_pinned_entries_are_listed_with_their_last_use(make: Factory, clock: Clock) -> None:
    storage = make()
    pinned = await store_blob(storage, b"pushed", pinned=True)
    await store_blob(storage, b"pulled")
    stored_at = clock.seconds()
    assert await result(storage.pinned(BLOB)) == {str(pinned): stored_at}
    clock.advance(100)
    assert await read_all(storage, pinned) == b"pushed"
    assert await result(storage.pinned(BLOB)) == {str(pinned): stored_at + 100}
    assert await result(storage.pinned(MANIFEST)) == {}


@pytest_twisted.ensureDeferred
async def test_entries_and_remove(make: Factory) -> None:
    storage = make()
    digest = await store_blob(storage, b"blob")
    await result(storage.put_manifest(digest, StoredManifest("t", b"blob")))
    await result(storage.put_tag("r/a:1#x", TagEntry(str(digest), "t", 1, 5.0)))
    assert await result(storage.entries(BLOB)) == [str(digest)]
    assert await result(storage.entries(MANIFEST)) == [str(digest)]
    assert await result(storage.entries(TAG)) == ["r/a:1#x"]
    assert await result(storage.remove(BLOB, str(digest))) is True
    assert await result(storage.remove(BLOB, str(digest))) is False
    assert await result(storage.open_blob(digest)) is None
    assert await result(storage.get_manifest(digest)) is not None


@pytest_twisted.ensureDeferred
async def test_upkeep_counts_and_evicts_through_the_interface(make: Factory) -> None:
    storage = make()
    await store_blob(storage, b"x" * 1000)
    await result(storage.put_tag("r/a:1#x", TagEntry("sha256:" + "0" * 64, "t", 1, 5.0)))
    found = await result(Deferred.fromCoroutine(upkeep.stats(storage)))
    assert found.by_kind == {BLOB: 1, MANIFEST: 0, TAG: 1}  # type: ignore[attr-defined]
    assert found.figures.entries == 2  # type: ignore[attr-defined]
    checked = await result(Deferred.fromCoroutine(upkeep.verify(storage)))
    assert checked == (1, [])
    assert await result(Deferred.fromCoroutine(upkeep.gc(storage))) == 0


@pytest_twisted.ensureDeferred
async def test_answers_are_counted_for_the_hit_ratio_and_kept_across_restarts(
    make: Factory,
) -> None:
    storage = make()
    for from_cache in (True, True, False):
        storage.count_answer(from_cache)
    await result(storage.update_figures())
    assert (storage.figures.hits, storage.figures.misses) == (2, 1)
    storage.count_answer(True)
    storage.stop()
    reopened = make()
    await result(reopened.update_figures())
    assert (reopened.figures.hits, reopened.figures.misses) == (3, 1)
