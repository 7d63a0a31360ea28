"""
The S3 backend against a real S3 server (OpenStack Swift's s3api): what
one node shares with another through the bucket, multipart uploads, bytes
changed in the bucket, and a bucket that goes away and comes back.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted
from harness.swift import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, botocore_client
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool

from txregistry.config import Secret
from txregistry.oci.reference import Digest
from txregistry.storage.disk import DiskStorage
from txregistry.storage.interface import IStorage, StoredManifest, TagEntry
from txregistry.storage.runner import run_inline
from txregistry.storage.s3 import PROBE_INTERVAL, S3Storage, object_key
from txregistry.storage.s3_client import Backoff, S3Client

MiB = 1 << 20


class Node:
    """One node's S3 backend: its own local tier, the shared bucket."""

    def __init__(self, directory: Path, endpoint: str, prefix: str, probe_clock: Clock) -> None:
        local = DiskStorage(directory, 1 << 30, run_inline)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.client = S3Client(
            agent,
            reactor,
            endpoint,
            BUCKET,
            REGION,
            True,
            Secret(ACCESS_KEY),
            Secret(SECRET_KEY),
            backoff=Backoff(attempts=2, first_delay=0.01),
        )
        self.storage = S3Storage(
            local, self.client, prefix, run_inline, probe_clock, part_size=5 * MiB
        )
        self.storage.start()


@pytest.fixture
def prefix() -> str:
    return f"it-{os.urandom(6).hex()}/"


@pytest.fixture
def nodes(tmp_path, swift, prefix):
    clock = Clock()
    made: list[Node] = []

    def node() -> Node:
        n = Node(tmp_path / f"node{len(made)}", swift.endpoint, prefix, clock)
        made.append(n)
        return n

    node.clock = clock  # type: ignore[attr-defined]
    yield node
    for n in made:
        pytest_twisted.blockon(Deferred.fromCoroutine(settle(n.storage)))
        n.storage.stop()


async def settle(storage: S3Storage) -> None:
    for upload in list(storage.uploads):
        await upload.done


async def store(storage: IStorage, data: bytes, chunk: int = MiB) -> Digest:
    digest = Digest.of(data)
    staged = storage.stage_blob(digest)
    for offset in range(0, len(data), chunk):
        staged.append(data[offset : offset + chunk])
    assert await staged.seal() == digest.hex
    assert await staged.commit(digest, len(data)) is True
    staged.close()
    return digest


class _Waiter:
    """Fires C{done} once a source is complete or has failed."""

    offset = 0

    def __init__(self, source) -> None:
        self.source = source
        self.done: Deferred[None] = Deferred()
        self.news = 0

    def more_data(self) -> None:
        self.news += 1
        if (self.source.is_complete() or self.source.failure()) and not self.done.called:
            self.done.callback(None)


async def read(storage: IStorage, digest: Digest) -> bytes | None:
    """The whole blob, once verified; None if it is not stored or its source failed."""
    blob = await storage.open_blob(digest)
    if blob is None:
        return None
    source = blob.source
    waiter = _Waiter(source)
    source.subscribe(waiter)
    waiter.more_data()
    await waiter.done
    source.unsubscribe(waiter)
    try:
        if source.failure() is not None:
            return None
        assert source.available() == blob.size
        return source.read(0, blob.size)
    finally:
        source.release()


@pytest_twisted.ensureDeferred
async def test_a_blob_one_node_stored_fills_another_nodes_empty_local_tier(nodes, swift, prefix):
    a, b = nodes(), nodes()
    data = os.urandom(12 * MiB + 12345)  # three parts: 5 MiB, 5 MiB and the rest
    digest = await store(a.storage, data)
    await settle(a.storage)
    assert a.storage.bucket_writes == 1
    s3 = botocore_client(swift.endpoint)
    key = object_key(prefix, "blob", str(digest))
    assert s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == len(data)
    assert not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")

    assert await read(b.storage, digest) == data
    assert b.storage.bucket_hits == 1
    # Now in b's local tier: the bucket is not asked again.
    s3.delete_object(Bucket=BUCKET, Key=key)
    assert await read(b.storage, digest) == data


@pytest_twisted.ensureDeferred
async def test_a_blob_from_the_bucket_is_served_as_it_arrives_but_for_its_last_byte(nodes):
    a, b = nodes(), nodes()
    data = os.urandom(20 * MiB)
    digest = await store(a.storage, data)
    await settle(a.storage)
    blob = await b.storage.open_blob(digest)
    assert blob is not None and blob.size == len(data)
    source = blob.source
    waiter = _Waiter(source)
    source.subscribe(waiter)
    seen_partial = []

    def watch() -> None:
        if not source.is_complete() and source.available() > 0:
            seen_partial.append(source.available())
        _Waiter.more_data(waiter)

    waiter.more_data = watch  # type: ignore[method-assign]
    await waiter.done
    source.unsubscribe(waiter)
    assert seen_partial, "readers were told of bytes before the whole blob arrived"
    assert max(seen_partial) <= len(data) - 1, "never the last byte before the check"
    assert source.read(len(data) - 100, 100) == data[-100:]
    source.release()
    assert await read(b.storage, digest) == data, "and now it is in the local tier"


@pytest_twisted.ensureDeferred
async def test_manifests_and_tag_answers_are_shared(nodes):
    a, b = nodes(), nodes()
    body = b'{"schemaVersion": 2, "x": "shared"}'
    digest = Digest.of(body)
    await a.storage.put_manifest(digest, StoredManifest("application/x.test", body))
    assert await b.storage.get_manifest(digest) == StoredManifest("application/x.test", body)
    old = TagEntry(str(digest), "application/x.test", len(body), 100.0)
    await b.storage.put_tag("docker.io/library/a:1", old)
    newer = TagEntry(str(digest), "application/x.test", len(body), 200.0)
    await a.storage.put_tag("docker.io/library/a:1", newer)
    # b's own answer is older than the one a confirmed: a's wins.
    assert await b.storage.get_tag("docker.io/library/a:1") == newer


@pytest_twisted.ensureDeferred
async def test_an_object_changed_in_the_bucket_is_never_served(nodes, swift, prefix):
    a, b = nodes(), nodes()
    data = os.urandom(300_000)
    digest = await store(a.storage, data)
    await settle(a.storage)
    s3 = botocore_client(swift.endpoint)
    key = object_key(prefix, "blob", str(digest))
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"x" + data[1:])
    assert await read(b.storage, digest) is None
    # Dropped from the bucket, so that the next fill stores it again.
    with pytest.raises(s3.exceptions.ClientError):
        s3.head_object(Bucket=BUCKET, Key=key)
    assert await b.storage.local.open_blob(digest) is None


@pytest_twisted.ensureDeferred
async def test_an_aborted_fill_leaves_no_object_and_no_upload(nodes, swift, prefix):
    a = nodes()
    data = os.urandom(11 * MiB)
    digest = Digest.of(data)
    staged = a.storage.stage_blob(digest)
    for offset in range(0, len(data), MiB):
        staged.append(data[offset : offset + MiB])
    upload = staged.upload  # type: ignore[attr-defined]
    await upload.first_part  # a multipart upload exists in the bucket now
    staged.abort()
    staged.close()
    await settle(a.storage)
    s3 = botocore_client(swift.endpoint)
    assert not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")
    assert not s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents")


@pytest_twisted.ensureDeferred
async def test_a_stopped_bucket_degrades_and_recovers(nodes, swift):
    a, b = nodes(), nodes()
    data = os.urandom(100_000)
    digest = await store(a.storage, data)
    await settle(a.storage)
    swift.stop_proxy()
    try:
        # The local tier still serves; the bucket is a miss, and degraded.
        assert await read(a.storage, digest) == data
        assert await read(b.storage, digest) is None
        assert b.storage.status == "degraded"
        description = b.storage.describe()
        assert description["bucket"]["status"] == "degraded"
        assert ACCESS_KEY not in str(description) and SECRET_KEY not in str(description)
        # While degraded, the bucket is not asked until the probe interval.
        failures = b.storage.bucket_failures
        assert await read(b.storage, digest) is None
        assert b.storage.bucket_failures == failures
    finally:
        swift.start_proxy()
    # Nothing asks the bucket, but the probe notices it is back.
    nodes.clock.advance(PROBE_INTERVAL)
    await b.storage.probed
    assert b.storage.status == "ok"
    assert await read(b.storage, digest) == data


def test_the_keys_are_never_in_a_message(tmp_path):
    client = S3Client(
        None,  # type: ignore[arg-type]
        Clock(),
        "http://127.0.0.1:1",
        BUCKET,
        REGION,
        True,
        Secret("AKIDSECRETACCESS"),
        Secret("verysecretkey"),
    )
    signed = client.signed_headers("GET", client.url("k"), {}, b"")
    assert "AKIDSECRETACCESS" in signed["Authorization"]  # sent, as SigV4 requires
    assert "verysecretkey" not in str(signed)
    assert hashlib.sha256(b"").hexdigest() == signed["X-Amz-Content-SHA256"]


@pytest_twisted.ensureDeferred
async def test_uploads_abandoned_by_a_crash_are_aborted_after_the_grace_period(
    nodes, swift, prefix
):
    import time

    from txregistry.storage.s3 import UPLOAD_GRACE

    a = nodes()
    s3 = botocore_client(swift.endpoint)
    s3.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}blobs/sha256/{'0' * 64}")
    assert await a.storage.clean_uploads() == 0, "too recent: it may be a fill in progress"
    a.storage._now = lambda: time.time() + UPLOAD_GRACE + 60
    assert await a.storage.clean_uploads() == 1
    assert not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")


@pytest_twisted.ensureDeferred
async def test_the_doctor_checks_the_bucket_with_a_signed_round_trip(swift, prefix):
    from txregistry.cli.bucket_check import check_bucket
    from txregistry.config import S3Config

    config = S3Config(
        endpoint=swift.endpoint,
        bucket=BUCKET,
        region=REGION,
        access_key=Secret(ACCESS_KEY),
        secret_key=Secret(SECRET_KEY),
        prefix=prefix,
    )
    good = await check_bucket(reactor, config)
    assert good.ok, good.text
    assert (
        not botocore_client(swift.endpoint)
        .list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        .get("Contents")
    ), "the probe object is deleted"
    from dataclasses import replace

    wrong_secret = "not-the-secret-key"
    bad = await check_bucket(reactor, replace(config, secret_key=Secret(wrong_secret)))
    assert not bad.ok
    assert "PUT failed" in bad.text and "check the keys" in bad.text
    assert wrong_secret not in bad.text
    missing = await check_bucket(reactor, replace(config, bucket="no-such-bucket"))
    assert not missing.ok and "NoSuchBucket" in missing.text, missing.text


@pytest_twisted.ensureDeferred
async def test_a_fresh_local_tag_answer_does_not_ask_the_bucket(nodes):
    import time

    a, b = nodes(), nodes()
    b.storage.tag_ttl = 300.0
    now = time.time()
    mine = TagEntry("sha256:" + "1" * 64, "application/x.test", 1, now - 10)
    await b.storage.put_tag("docker.io/library/a:2", mine)
    await a.storage.put_tag(
        "docker.io/library/a:2", TagEntry("sha256:" + "2" * 64, "application/x.test", 1, now)
    )
    assert await b.storage.get_tag("docker.io/library/a:2") == mine, "within tag_ttl: its own"
    b.storage.tag_ttl = 5.0
    shared = await b.storage.get_tag("docker.io/library/a:2")
    assert shared is not None and shared.digest == "sha256:" + "2" * 64, "past it: the newer"
