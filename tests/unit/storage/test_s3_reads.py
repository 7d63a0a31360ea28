"""
Reads from the bucket, in memory: requests for one blob at once share one
GET (single flight), and a shared read that fails its digest fails for all.
"""

from __future__ import annotations

import hashlib
import os

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from txregistry.oci.reference import Digest
from txregistry.storage.disk import DiskStorage
from txregistry.storage.interface import StoredBlob
from txregistry.storage.runner import run_inline
from txregistry.storage.s3 import S3Storage
from txregistry.storage.staging import InlineSpool


class HeldResponse:
    """A GET's response whose body the test sends."""

    def __init__(self, length: int) -> None:
        self.code = 200
        self.length = length
        self.headers = Headers()
        self.protocol = None

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(StringTransport())

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        self.protocol.connectionLost(Failure(ResponseDone()))


class HeldBucket:
    """The part of L{S3Client} reads use: every GET waits for the test to answer it."""

    endpoint = "http://bucket.test"
    bucket = "txr"

    def __init__(self) -> None:
        self.gets: list[tuple[str, Deferred[HeldResponse | None]]] = []

    async def get_object(self, key: str) -> HeldResponse | None:
        answer: Deferred[HeldResponse | None] = Deferred()
        self.gets.append((key, answer))
        return await answer

    async def head_bucket(self) -> None:
        pass

    async def head_object(self, key: str) -> object:
        return object()  # present: nothing to heal

    async def put_object(self, key: str, body: bytes, **_: object) -> None:
        pass


def node(tmp_path) -> tuple[S3Storage, HeldBucket]:
    clock = Clock()
    clock.advance(1_000_000)
    bucket = HeldBucket()
    local = DiskStorage(tmp_path, 1 << 30, run_inline, spools=InlineSpool, now=clock.seconds)
    storage = S3Storage(local, bucket, "c/", run_inline, clock, now=clock.seconds)  # type: ignore[arg-type]
    storage.start()
    return storage, bucket


def body(stored: StoredBlob) -> bytes:
    assert stored.source.is_complete()
    return stored.source.read(0, stored.size)


@pytest_twisted.ensureDeferred
async def test_two_requests_for_one_blob_share_one_bucket_get(tmp_path) -> None:
    storage, bucket = node(tmp_path)
    data = os.urandom(100_000)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    first = storage.open_blob(digest)
    second = storage.open_blob(digest)
    assert len(bucket.gets) == 1, "the second request waits for the first's GET"
    response = HeldResponse(len(data))
    bucket.gets[0][1].callback(response)
    one, two = await first, await second
    assert one is not None and two is not None
    assert one.source is two.source
    response.send(data)
    assert body(one) == body(two) == data
    assert storage.bucket_hits == 1 and storage.bucket_read_joins == 1
    one.source.release()
    two.source.release()
    # Now from the local tier: no more GETs.
    third = await storage.open_blob(digest)
    assert third is not None and third.source.read(0, len(data)) == data
    third.source.release()
    assert len(bucket.gets) == 1


@pytest_twisted.ensureDeferred
async def test_a_shared_read_that_fails_its_digest_fails_for_every_request(tmp_path) -> None:
    storage, bucket = node(tmp_path)
    data = os.urandom(100_000)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    first = storage.open_blob(digest)
    second = storage.open_blob(digest)
    response = HeldResponse(len(data))
    bucket.gets[0][1].callback(response)
    one, two = await first, await second
    assert one is not None and two is not None
    deletes: list[str] = []

    async def delete_object(key: str) -> None:
        deletes.append(key)

    bucket.delete_object = delete_object  # type: ignore[attr-defined]
    response.send(b"x" + data[1:])
    for stored in (one, two):
        assert stored.source.failure() is not None
        assert not stored.source.is_complete()
        assert stored.source.available() < len(data), "never the last byte"
        stored.source.release()
    assert deletes == [f"c/blobs/sha256/{digest.hex}"]
    # The next request is a miss that asks the bucket again.
    again = storage.open_blob(digest)
    assert len(bucket.gets) == 2
    bucket.gets[1][1].callback(None)  # no such key any more
    assert await again is None
