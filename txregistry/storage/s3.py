"""
The S3 backend: content shared by every node in one bucket, with the
node's own disk store (L{DiskStorage}) as a local tier in front of it.

Layout of the bucket, under C{prefix}::

    blobs/<algorithm>/<hex>       a blob's exact bytes
    manifests/<algorithm>/<hex>   a manifest's bytes; its media type is the
                                  object's Content-Type
    tags/<key>                    a tag answer, as JSON, shared by the nodes

Content goes under its digest, so a write needs no copy on commit, and two
nodes writing the same blob write the same bytes.  Lookups are by key,
never by listing (Swift's S3 layer lists what was just written late).

Reads try the local tier first, then the bucket.  What comes from the
bucket is verified against its digest before it enters the local tier or
is served; an object that does not match is deleted from the bucket and
counts as a miss, so the pull-through fetches it again and heals it.

A fill is staged in the local tier as before, and streams into a
multipart upload as it arrives (parts of L{PART_SIZE}, read back from the
staged file, so memory holds one part per upload).  The upload is
completed only once the fill has committed its verified digest, and
aborted if it is aborted or cut; a blob smaller than one part is a single
PUT at commit.  Uploads left behind by a crash are aborted by
L{S3Storage.clean_uploads} once older than L{UPLOAD_GRACE}.

The bucket failing never fails a request: a lookup that fails is a miss,
a write that fails is skipped, the backend says it is degraded, and for
L{PROBE_INTERVAL} the bucket is not asked at all (one request then tries
again), so that pulls from the local tier and the upstream do not wait on
it.  Everything the local tier holds stays there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

from txregistry.oci.reference import Digest
from txregistry.storage.disk import DiskStorage, LocalFile
from txregistry.storage.interface import (
    BLOB,
    MANIFEST,
    TAG,
    IStagedBlob,
    IStorage,
    Reader,
    StorageFigures,
    StoredBlob,
    StoredManifest,
    TagEntry,
)
from txregistry.storage.runner import BlockingRunner
from txregistry.storage.s3_client import S3Client, S3Error, file_range_body
from txregistry.storage.staging import StagedFile

T = TypeVar("T")

# S3's minimum part size is 5 MiB (but for the last part).
PART_SIZE = 8 << 20
# How far a download from the bucket may run ahead of the local disk.
_AHEAD = 8 << 20
PROBE_INTERVAL = 10.0
UPLOAD_GRACE = 24 * 3600.0
# A node records a use of an object in the bucket at most this often...
TOUCH_INTERVAL = 3600.0
# ...and the bucket's gc leaves alone whatever was written or used this
# recently: twice the interval, so that an object a node is reading (and so
# touched, or had touched within the interval) is never taken from under it.
GC_GRACE = 2 * TOUCH_INTERVAL


def pin_key(prefix: str, kind: str, name: str) -> str:
    """Where a pin is kept in the bucket: an empty object, which gc respects."""
    return f"{prefix}pinned/{object_key('', kind, name)}"


def access_key(prefix: str, kind: str, name: str) -> str:
    """Where the last use of an object is recorded: an empty object, by its LastModified."""
    return f"{prefix}access/{object_key('', kind, name)}"


def object_key(prefix: str, kind: str, name: str) -> str:
    if kind == TAG:
        return f"{prefix}tags/{quote(name, safe='')}"
    digest = Digest.parse(name)
    folder = "blobs" if kind == BLOB else "manifests"
    return f"{prefix}{folder}/{digest.algorithm}/{digest.hex}"


@implementer(IStorage)
class S3Storage:
    """
    A bucket shared by the fleet, behind this node's local tier.

    @ivar bucket_hits: blobs and manifests the bucket had and the local tier did not.
    @ivar bucket_writes: objects written to the bucket.
    """

    name = "s3"
    log = Logger()

    def __init__(
        self,
        local: DiskStorage,
        client: S3Client,
        prefix: str,
        run_blocking: BlockingRunner,
        clock: IReactorTime,
        part_size: int = PART_SIZE,
        now: Callable[[], float] = time.time,
        size_limit: int | None = None,
        tag_ttl: float = 0.0,
    ) -> None:
        """
        @param size_limit: the most the bucket may hold under C{prefix}
            (blobs and manifests), applied by L{collect_garbage}; None for no limit.
        @param tag_ttl: a local tag answer this young is used without asking
            the bucket for a newer one (it would be used as it is anyway).
        """
        self.local = local
        self.client = client
        self.prefix = prefix
        self._run = run_blocking
        self._clock = clock
        self.part_size = part_size
        self._now = now
        self.bucket_problem: str | None = None
        self._skip_until = 0.0
        self.bucket_hits = 0
        self.bucket_writes = 0
        self.bucket_failures = 0
        self.size_limit = size_limit
        self.tag_ttl = tag_ttl
        self.bucket_evictions = 0
        # When this node last recorded a use of each object, by key.
        self._touched: dict[str, float] = {}
        self._probe_call: IDelayedCall | None = None
        # Uploads in progress, so that a stop can wait for none and tests can watch.
        self.uploads: set[_Upload] = set()
        # Blobs being read from the bucket, so that requests for one at once
        # share one GET (single flight); and how many shared another's.
        self._bucket_reads: dict[Digest, _BucketLookup] = {}
        self.bucket_read_joins = 0

    # State.

    @property
    def status(self) -> str:
        if self.local.status == "unavailable" and self.bucket_problem:
            return "unavailable"
        if self.bucket_problem:
            return "degraded"
        return str(self.local.status)

    @property
    def problem(self) -> str | None:
        return self.bucket_problem or self.local.problem

    @property
    def evictions(self) -> int:
        return int(self.local.evictions)

    @property
    def figures(self) -> StorageFigures:
        figures: StorageFigures = self.local.figures
        return figures

    def start(self) -> None:
        """Open the local tier, and look at the bucket in the background, for C{/health}."""
        self.local.start()
        self.probed = ensureDeferred(self._probe())

    async def _probe(self) -> None:
        try:
            await self.client.head_bucket()
        except S3Error as e:
            # Any failure here, even a 404 (no such bucket), degrades us.
            self._bucket_failed(e)
        else:
            if self.bucket_problem is None:
                self.log.info(
                    "bucket {bucket} at {endpoint} reachable",
                    bucket=self.client.bucket,
                    endpoint=self.client.endpoint,
                )
            self._bucket_worked()

    def _schedule_probe(self) -> None:
        """
        While degraded, look at the bucket every L{PROBE_INTERVAL}: a node
        serving only from its local tier would otherwise never notice that
        the bucket is back.
        """
        if self._probe_call is None or not self._probe_call.active():
            self._probe_call = self._clock.callLater(PROBE_INTERVAL, self._probe_now)

    def _probe_now(self) -> None:
        self._probe_call = None
        if self.bucket_problem is not None:
            self.probed = ensureDeferred(self._probe())

    def stop(self) -> None:
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self.local.stop()

    def report_problem(self, problem: str) -> None:
        self.local.report_problem(problem)

    def describe(self) -> dict[str, Any]:
        bucket: dict[str, Any] = {
            "endpoint": self.client.endpoint,
            "bucket": self.client.bucket,
            "prefix": self.prefix,
            "status": "degraded" if self.bucket_problem else "ok",
        }
        if self.bucket_problem:
            bucket["problem"] = self.bucket_problem
        description: dict[str, Any] = {
            "backend": self.name,
            "status": self.status,
            "bucket": bucket,
            "local": self.local.describe(),
        }
        if self.problem:
            description["problem"] = self.problem
        return description

    def _bucket_usable(self) -> bool:
        """Whether to ask the bucket now: always while it works, once a probe interval if not."""
        if self.bucket_problem is None:
            return True
        if self._clock.seconds() >= self._skip_until:
            self._skip_until = self._clock.seconds() + PROBE_INTERVAL
            return True
        return False

    def _bucket_failed(self, error: Exception) -> None:
        self.bucket_failures += 1
        problem = f"bucket {self.client.bucket} at {self.client.endpoint}: {error}"
        if self.bucket_problem is None:
            self.log.error(
                "storage degraded: {problem}; serving from the local tier and the upstream",
                problem=problem,
            )
        self.bucket_problem = problem
        self._skip_until = self._clock.seconds() + PROBE_INTERVAL
        self._schedule_probe()

    def _bucket_worked(self) -> None:
        if self.bucket_problem is not None:
            self.log.info(
                "bucket {bucket} reachable again: sharing content through it",
                bucket=self.client.bucket,
            )
            self.bucket_problem = None

    async def _in_bucket(self, operation: Callable[[], Awaitable[T]]) -> T | None:
        """Run one bucket operation; its failure is reported and becomes None."""
        if not self._bucket_usable():
            return None
        try:
            result = await operation()
        except S3Error as e:
            if e.retryable:
                self._bucket_failed(e)
            else:
                self.log.warn("{error}", error=str(e))
            return None
        self._bucket_worked()
        return result

    async def _done_in_bucket(self, operation: Callable[[], Awaitable[None]]) -> bool:
        """Run one bucket operation that returns nothing; whether it worked."""

        async def done() -> bool:
            await operation()
            return True

        return bool(await self._in_bucket(done))

    # Blobs.

    def can_stage(self, size: int | None) -> bool:
        return bool(self.local.can_stage(size))

    def stage_blob(self, digest: Digest) -> IStagedBlob:
        staged = self.local.stage_blob(digest)
        assert isinstance(staged, StagedFile)
        return _TieredStaged(staged, _Upload(self, digest, staged.duplicate_fd()))

    def open_blob(self, digest: Digest, touch: bool = True) -> Deferred[StoredBlob | None]:
        """
        From the local tier, else the bucket.  Upkeep (C{touch=False}: the
        scrub, C{cache verify}) reads the local tier only: it checks what this
        node holds, and must not download the fleet's bucket to do it.
        """
        if not touch:
            local: Deferred[StoredBlob | None] = self.local.open_blob(digest, touch)
            return local
        return ensureDeferred(self._open_blob(digest))

    async def _open_blob(self, digest: Digest) -> StoredBlob | None:
        local: StoredBlob | None = await self.local.open_blob(digest)
        if local is not None:
            self._touch(BLOB, str(digest))
            return local
        lookup = self._bucket_reads.get(digest)
        if lookup is not None:
            # Another request is reading it from the bucket: share its
            # download rather than make a second GET.
            read = await lookup.result()
            if read is None or not read.share():
                return None
            self.bucket_read_joins += 1
            return StoredBlob(read, read.size)
        lookup = _BucketLookup()
        self._bucket_reads[digest] = lookup
        read = None
        try:
            read = await self._read_from_bucket(digest)
        finally:
            lookup.found(read)
            if read is None or read.ended:
                self._read_ended(digest, lookup)
            else:
                read.on_end = lambda: self._read_ended(digest, lookup)
        if read is None:
            return None
        self._touch(BLOB, str(digest))
        return StoredBlob(read, read.size)

    def _read_ended(self, digest: Digest, lookup: _BucketLookup) -> None:
        """New requests for C{digest} look in the local tier (and the bucket) again."""
        if self._bucket_reads.get(digest) is lookup:
            del self._bucket_reads[digest]

    async def _read_from_bucket(self, digest: Digest) -> BucketRead | None:
        key = object_key(self.prefix, BLOB, str(digest))
        response = await self._in_bucket(lambda: self.client.get_object(key))
        if response is None:
            return None
        size = response.length if isinstance(response.length, int) else None
        if size is None or not self.local.can_stage(size):
            # Served through the local tier or not at all: the upstream
            # streams a blob too large for it, uncached, as without a bucket.
            response.deliverBody(_Discard())
            return None
        try:
            staged = self.local.stage_blob(digest)
        except OSError:
            response.deliverBody(_Discard())
            return None
        assert isinstance(staged, StagedFile)
        source = BucketRead(self, digest, key, size, staged)
        response.deliverBody(source.receiver())
        return source

    async def _bucket_blob_arrived(self, read: BucketRead) -> None:
        """A blob from the bucket is all on local disk: verify it, then keep it or drop it."""
        hex_digest = await read.staged.seal()
        if read.failure() is not None:
            read.staged.abort()
            return
        if hex_digest != read.digest.hex or read.received != read.size:
            read.staged.abort()
            self.log.error(
                "bucket object {key} does not match its digest {digest}: deleting it;"
                " it is fetched again from the upstream",
                key=read.key,
                digest=str(read.digest),
            )
            key = read.key
            await self._done_in_bucket(lambda: self.client.delete_object(key))
            read.fail(
                BlobChangedInBucket(
                    f"bucket object {read.key} does not match its digest {read.digest}"
                )
            )
            return
        # Verified: into the local tier, then every reader may have the last
        # byte, whether or not the local tier managed to keep it.
        self.bucket_hits += 1
        try:
            await read.staged.commit(read.digest, read.size)
        finally:
            read.complete()

    # Manifests.

    def get_manifest(self, digest: Digest, touch: bool = True) -> Deferred[StoredManifest | None]:
        if not touch:
            local: Deferred[StoredManifest | None] = self.local.get_manifest(digest, touch)
            return local
        return ensureDeferred(self._get_manifest(digest))

    async def _get_manifest(self, digest: Digest) -> StoredManifest | None:
        local: StoredManifest | None = await self.local.get_manifest(digest)
        if local is not None:
            self._touch(MANIFEST, str(digest))
            return local
        key = object_key(self.prefix, MANIFEST, str(digest))
        response = await self._in_bucket(lambda: self.client.get_object(key))
        if response is None:
            return None
        try:
            body = await _content(response)
        except Exception as e:
            self._bucket_failed(S3Error("GET", None, "cut", f"{key}: {e}"))
            return None
        hasher = digest.hasher()
        hasher.update(body)
        if hasher.hexdigest() != digest.hex:
            self.log.error(
                "bucket object {key} does not match its digest {digest}: deleting it",
                key=key,
                digest=str(digest),
            )
            await self._in_bucket(lambda: self.client.delete_object(key))
            return None
        media_type = response.headers.getRawHeaders("content-type", [""])[0]
        manifest = StoredManifest(str(media_type), body)
        self.bucket_hits += 1
        self._touch(MANIFEST, str(digest))
        await self.local.put_manifest(digest, manifest)
        return manifest

    def put_manifest(
        self, digest: Digest, manifest: StoredManifest, pinned: bool = False
    ) -> Deferred[bool]:
        return ensureDeferred(self._put_manifest(digest, manifest, pinned))

    async def _put_manifest(self, digest: Digest, manifest: StoredManifest, pinned: bool) -> bool:
        stored: bool = await self.local.put_manifest(digest, manifest, pinned)
        if pinned:
            await self._mark_pinned(MANIFEST, str(digest), True)
        key = object_key(self.prefix, MANIFEST, str(digest))
        written = await self._done_in_bucket(
            lambda: self.client.put_object(key, manifest.body, content_type=manifest.media_type)
        )
        if written:
            self.bucket_writes += 1
        return stored or written

    # Tags.

    def get_tag(self, key: str) -> Deferred[TagEntry | None]:
        return ensureDeferred(self._get_tag(key))

    async def _get_tag(self, key: str) -> TagEntry | None:
        """The newer of the local and the shared answer: another node may have checked it."""
        local: TagEntry | None = await self.local.get_tag(key)
        if local is not None and self._now() - local.checked_at < self.tag_ttl:
            return local
        shared_body = await self._in_bucket(
            lambda: self.client.get_small(object_key(self.prefix, TAG, key))
        )
        shared = _tag_entry(shared_body) if shared_body else None
        if shared is not None and (local is None or shared.checked_at > local.checked_at):
            await self.local.put_tag(key, shared)
            return shared
        return local

    def put_tag(self, key: str, entry: TagEntry, pinned: bool = False) -> Deferred[bool]:
        return ensureDeferred(self._put_tag(key, entry, pinned))

    async def _put_tag(self, key: str, entry: TagEntry, pinned: bool) -> bool:
        stored: bool = await self.local.put_tag(key, entry, pinned)
        body = json.dumps(
            {
                "digest": entry.digest,
                "media_type": entry.media_type,
                "size": entry.size,
                "checked_at": entry.checked_at,
            }
        ).encode()
        written = await self._done_in_bucket(
            lambda: self.client.put_object(
                object_key(self.prefix, TAG, key), body, content_type="application/json"
            )
        )
        if written:
            self.bucket_writes += 1
        return stored or written

    # Entries.

    def remove(self, kind: str, name: str) -> Deferred[bool]:
        return ensureDeferred(self._remove(kind, name))

    async def _remove(self, kind: str, name: str) -> bool:
        removed: bool = await self.local.remove(kind, name)
        key = object_key(self.prefix, kind, name)
        # S3's DELETE says nothing of whether the object was there.
        present = await self._in_bucket(lambda: self.client.head_object(key))
        if present is not None:
            await self._done_in_bucket(lambda: self.client.delete_object(key))
        if kind != TAG:
            await self._mark_pinned(kind, name, False)
        return removed or present is not None

    def drop_corrupt(self, kind: str, name: str, problem: str) -> Deferred[bool]:
        """
        The local copy failed a check: drop it there.  The bucket's copy is
        checked on its own whenever it is read, and dropped if it fails.
        """
        dropped: Deferred[bool] = self.local.drop_corrupt(kind, name, problem)
        return dropped

    @property
    def corrupt_removed(self) -> int:
        return int(self.local.corrupt_removed)

    def pin(self, kind: str, name: str, pinned: bool) -> Deferred[bool]:
        """Pin locally, and in the bucket, so that its gc never deletes pushed content."""
        return ensureDeferred(self._pin(kind, name, pinned))

    async def _pin(self, kind: str, name: str, pinned: bool) -> bool:
        changed: bool = await self.local.pin(kind, name, pinned)
        await self._mark_pinned(kind, name, pinned)
        return changed

    async def _mark_pinned(self, kind: str, name: str, pinned: bool) -> None:
        key = pin_key(self.prefix, kind, name)
        if pinned:
            await self._done_in_bucket(lambda: self.client.put_object(key, b""))
        else:
            await self._done_in_bucket(lambda: self.client.delete_object(key))

    def update_figures(self) -> Deferred[None]:
        result: Deferred[None] = self.local.update_figures()
        return result

    def count_answer(self, from_cache: bool) -> None:
        self.local.count_answer(from_cache)

    def entries(self, kind: str) -> Deferred[list[str]]:
        result: Deferred[list[str]] = self.local.entries(kind)
        return result

    def pinned(self, kind: str) -> Deferred[dict[str, float]]:
        """This node's pinned entries (what was pushed to it), from its local tier."""
        result: Deferred[dict[str, float]] = self.local.pinned(kind)
        return result

    def evict_to_limit(self) -> Deferred[int]:
        result: Deferred[int] = self.local.evict_to_limit()
        return result

    # Upkeep of the bucket.

    def upkeep(self) -> Deferred[None]:
        """The bucket's periodic upkeep: abandoned uploads, then the size limit."""

        async def both() -> None:
            try:
                await self._clean_uploads()
                await self._collect_garbage()
            except Exception:
                # Bucket failures are S3Errors, handled on the way; this is a
                # bug, and must not stop the next hour's upkeep.
                self.log.failure("the bucket's upkeep failed")

        return ensureDeferred(both())

    def clean_uploads(self) -> Deferred[int]:
        """Abort multipart uploads under our prefix older than L{UPLOAD_GRACE}: left by a crash."""
        return ensureDeferred(self._clean_uploads())

    async def _clean_uploads(self) -> int:
        uploads = await self._in_bucket(lambda: self.client.list_multipart_uploads(self.prefix))
        aborted = 0
        for upload in uploads or []:
            started = _parse_time(upload.initiated)
            if started is None or self._now() - started < UPLOAD_GRACE:
                continue
            key, upload_id = upload.key, upload.upload_id
            done = await self._done_in_bucket(
                lambda: self.client.abort_multipart(key, upload_id)  # noqa: B023
            )
            if done:
                aborted += 1
        if aborted:
            self.log.info("aborted {count} abandoned multipart uploads", count=aborted)
        return aborted

    def _touch(self, kind: str, name: str) -> None:
        """
        Record, at most once per L{TOUCH_INTERVAL} per object and node, that
        this node uses it: the bucket's LRU is across the fleet, and a node
        that serves a blob from its local tier must keep it warm there too.
        In the background: a lost touch only makes the object look older.
        """
        key = access_key(self.prefix, kind, name)
        now = self._now()
        if now - self._touched.get(key, -TOUCH_INTERVAL) < TOUCH_INTERVAL:
            return
        if self.bucket_problem is not None:
            return
        self._touched[key] = now
        ensureDeferred(
            self._done_in_bucket(
                lambda: self.client.put_object(key, b"", content_type="application/octet-stream")
            )
        )
        if kind == BLOB:
            ensureDeferred(self._heal(Digest.parse(name)))

    async def _heal(self, digest: Digest) -> None:
        """
        A blob this node serves from its local tier should be in the bucket
        too: one fetched while the bucket was down is not.  Checked with the
        touch, so at most once an interval per blob; uploaded from the
        local file if missing.
        """
        key = object_key(self.prefix, BLOB, str(digest))
        try:
            present = await self.client.head_object(key)
        except S3Error as e:
            if e.retryable:
                self._bucket_failed(e)
            return
        if present is not None:
            return
        stored: StoredBlob | None = await self.local.open_blob(digest, False)
        if stored is None or not isinstance(stored.source, LocalFile):
            return
        try:
            fd = os.dup(stored.source.fileno())
        finally:
            stored.source.release()
        self.log.info("uploading {digest} to the bucket, which lacks it", digest=str(digest))
        await _Upload(self, digest, fd).commit(stored.size)

    def collect_garbage(self) -> Deferred[int]:
        """
        Keep the bucket under its size limit, least recently used (across
        the fleet) first; how many objects were deleted.

        Safe on two nodes at once: both see the same listing, delete the same
        objects, and S3's DELETE is idempotent.  Nothing written or used
        within L{GC_GRACE} is deleted, so a fill being completed or a blob
        being read stays.
        """
        return ensureDeferred(self._collect_garbage())

    async def _collect_garbage(self) -> int:
        if self.size_limit is None:
            return 0
        listed = await self._in_bucket(lambda: self.client.list_objects(self.prefix))
        if listed is None:
            return 0
        used: dict[str, float] = {}
        content: dict[str, tuple[int, float]] = {}
        access_prefix = f"{self.prefix}access/"
        pinned_prefix = f"{self.prefix}pinned/"
        pinned: set[str] = set()
        for item in listed:
            when = _parse_time(item.last_modified) or 0.0
            if item.key.startswith(pinned_prefix):
                pinned.add(self.prefix + item.key[len(pinned_prefix) :])
            elif item.key.startswith(access_prefix):
                target = self.prefix + item.key[len(access_prefix) :]
                used[target] = max(used.get(target, 0.0), when)
            elif item.key.startswith((f"{self.prefix}blobs/", f"{self.prefix}manifests/")):
                content[item.key] = (item.size, when)
        total = sum(size for size, _ in content.values())
        now = self._now()
        candidates = sorted(
            (max(written, used.get(key, 0.0)), key, size)
            for key, (size, written) in content.items()
        )
        deleted = 0
        for last_used, key, size in candidates:
            if total <= self.size_limit:
                break
            if now - last_used < GC_GRACE:
                break  # everything after it is younger still
            if key in pinned:
                continue  # pushed content is never evicted
            access = access_prefix + key[len(self.prefix) :]
            if not await self._done_in_bucket(lambda: self.client.delete_object(key)):  # noqa: B023
                break
            await self._done_in_bucket(lambda: self.client.delete_object(access))  # noqa: B023
            total -= size
            deleted += 1
        if deleted:
            self.bucket_evictions += deleted
            self.log.info(
                "bucket gc: deleted {count} least recently used objects; {size} bytes remain",
                count=deleted,
                size=total,
            )
        return deleted

    def bucket_entries(self, kind: str) -> Deferred[list[str]]:
        """The names of one kind of entry in the bucket (a listing: for stats, not lookups)."""
        return ensureDeferred(self._bucket_entries(kind))

    async def _bucket_entries(self, kind: str) -> list[str]:
        folder = {BLOB: "blobs/", MANIFEST: "manifests/", TAG: "tags/"}[kind]
        listed = await self._in_bucket(lambda: self.client.list_objects(self.prefix + folder))
        names = []
        for item in listed or []:
            rest = item.key[len(self.prefix) + len(folder) :]
            if kind == TAG:
                names.append(rest)
            else:
                names.append(rest.replace("/", ":", 1))
        return names


class BlobChangedInBucket(Exception):
    """A bucket object's bytes do not match the digest it is stored under."""


class BucketRead:
    """
    A blob arriving from the bucket into the local tier, served as it
    arrives (a L{ByteSource}): readers get the bytes once they are on local
    disk, and the last byte only once all of them matched the digest.  A
    mismatch or a cut fails the source, so that clients' connections are
    aborted rather than given wrong bytes.
    """

    def __init__(
        self, storage: S3Storage, digest: Digest, key: str, size: int, staged: StagedFile
    ) -> None:
        self._storage = storage
        self.digest = digest
        self.key = key
        self.size = size
        self.staged = staged
        self.received = 0
        self._complete = False
        self._failure: Failure | None = None
        self._readers: set[Reader] = set()
        # One reference for the StoredBlob's receiver, one for the download.
        self._references = 2
        self._closed = False
        self._watching = False
        # Told once, when the read has completed or failed.
        self.on_end: Callable[[], None] = lambda: None
        self.ended = False

    def share(self) -> bool:
        """One more request serves this read, if it is still usable: whether it is."""
        if self._closed or self._failure is not None or self.ended:
            return False
        self._references += 1
        return True

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.on_end()

    def receiver(self) -> _IntoStaged:
        done: Deferred[int] = Deferred()
        done.addCallbacks(self._arrived, self._download_cut)
        self._receiver = _IntoStaged(self.staged, done, self._progress)
        return self._receiver

    # ByteSource.

    def read(self, offset: int, length: int) -> bytes:
        return self.staged.read(offset, min(length, self.staged.written - offset))

    def available(self) -> int:
        if self._complete:
            return self.size
        return max(0, min(self.staged.written, self.size - 1))

    def is_complete(self) -> bool:
        return self._complete

    def failure(self) -> Failure | None:
        return self._failure

    def subscribe(self, reader: Reader) -> None:
        self._readers.add(reader)

    def unsubscribe(self, reader: Reader) -> None:
        self._readers.discard(reader)

    def release(self) -> None:
        self._references -= 1
        if self._references == 0 and not self._closed:
            self._closed = True
            self.staged.close()

    # Driven by the download.

    def _progress(self) -> None:
        """More is on its way to disk: tell readers whenever the disk catches up."""
        failure = self.staged.failure
        if failure is not None and self._failure is None and not self._complete:
            # The local tier cannot take it: readers, who read from its file,
            # would wait for ever.  They are aborted, and retry.
            self._storage.report_problem(f"cannot write a blob from the bucket: {failure}")
            self._failure = Failure(failure)
            self._notify()
            return
        self._notify()
        if not self._watching and self._failure is None and not self._complete:
            self._watching = True
            self.staged.wake_on_progress(self.staged.written, self._written)

    def _written(self) -> None:
        self._watching = False
        if self.staged.written < self._receiver.received:
            self._progress()
        else:
            self._notify()

    def _arrived(self, received: int) -> None:
        self.received = received
        d = ensureDeferred(self._storage._bucket_blob_arrived(self))
        d.addErrback(self._cut)
        d.addBoth(lambda _: self.release())

    def _download_cut(self, failure: Failure) -> None:
        self._cut(failure)
        self.release()

    def _cut(self, failure: Failure) -> None:
        if self._complete or self._failure is not None:
            return
        self.staged.abort()
        self._storage._bucket_failed(
            S3Error("GET", None, "cut", f"{self.key}: {failure.getErrorMessage()}")
        )
        self._failure = failure
        self._notify()

    def fail(self, error: BaseException) -> None:
        self._failure = Failure(error)
        self._notify()

    def complete(self) -> None:
        self._complete = True
        self._notify()

    def _notify(self) -> None:
        if self._complete or self._failure is not None:
            self._end()
        for reader in list(self._readers):
            reader.more_data()


class _BucketLookup:
    """A GET of a blob from the bucket under way: what it found, for those who wait."""

    def __init__(self) -> None:
        self._done = False
        self._read: BucketRead | None = None
        self._waiting: list[Deferred[BucketRead | None]] = []

    def result(self) -> Deferred[BucketRead | None]:
        waiting: Deferred[BucketRead | None] = Deferred()
        if self._done:
            waiting.callback(self._read)
        else:
            self._waiting.append(waiting)
        return waiting

    def found(self, read: BucketRead | None) -> None:
        self._done, self._read = True, read
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(read)


class _Upload:
    """
    One blob on its way into the bucket, from the staged file: parts go up
    as the fill writes them, one at a time, read back off the reactor
    thread; the upload completes only at L{commit}.
    """

    def __init__(self, storage: S3Storage, digest: Digest, fd: int) -> None:
        self._storage = storage
        self.storage = storage
        self._client = storage.client
        self.digest = digest
        self.key = object_key(storage.prefix, BLOB, str(digest))
        self._fd: int | None = fd
        self._upload_id: str | None = None
        self._etags: list[str] = []
        self.sent = 0
        self._busy: Deferred[None] | None = None
        self.failed: Exception | None = None
        self.finished = False
        self._committing = False
        # Fired once the upload has ended, either way, and when its first
        # part is up (for tests, and for a stop that waits for uploads).
        self.done: Deferred[None] = Deferred()
        self.first_part: Deferred[None] = Deferred()
        # Set to skip the bucket: it is failing now, or the blob is already there.
        self._skip = not storage._bucket_usable()
        storage.uploads.add(self)

    def progress(self, written: int) -> None:
        """The fill has C{written} bytes on disk: send a part if a whole one is waiting."""
        if self._skip or self.failed or self._busy is not None or self.finished:
            return
        if self._committing:
            return  # the commit sends the rest itself
        if written - self.sent >= self._storage.part_size:
            self._busy = ensureDeferred(self._send_part(self._storage.part_size))
            self._busy.addBoth(self._part_done, written)

    def _part_done(self, _: object, written: int) -> None:
        self._busy = None
        self.progress(written)

    async def _send_part(self, length: int) -> None:
        try:
            if self._upload_id is None:
                self._upload_id = await self._client.create_multipart(self.key)
            assert self._fd is not None
            # Hashed off the reactor thread (SigV4 signs the part's SHA-256),
            # then streamed from the file: memory holds a chunk, not a part.
            sha256 = await self._storage._run(self._hash, self.sent, length)
            etag = await self._client.upload_part(
                self.key,
                self._upload_id,
                len(self._etags) + 1,
                file_range_body(self._fd, self.sent, length),
                sha256,
            )
        except Exception as e:
            self.failed = e
            return
        self._etags.append(etag)
        self.sent += length
        if not self.first_part.called:
            self.first_part.callback(None)

    def _hash(self, offset: int, length: int) -> str:
        """The SHA-256 of a range of the file, read 1 MiB at a time; in the runner's thread."""
        assert self._fd is not None
        hasher = hashlib.sha256()
        end = offset + length
        while offset < end:
            chunk = os.pread(self._fd, min(end - offset, 1 << 20), offset)
            if not chunk:
                raise OSError(f"the file of {self.digest} ended at byte {offset} of {end}")
            hasher.update(chunk)
            offset += len(chunk)
        return hasher.hexdigest()

    def commit(self, size: int) -> Deferred[None]:
        """The fill verified its digest: send the rest, and complete (in the background)."""
        self._committing = True
        return ensureDeferred(self._commit(size))

    async def _commit(self, size: int) -> None:
        try:
            while self._busy is not None:
                await self._busy
            if self._skip:
                return
            if self._upload_id is None and size <= self._storage.part_size:
                # Smaller than a part: one PUT (of the same bytes, should
                # another node have stored it meanwhile).
                assert self._fd is not None
                sha256 = await self._storage._run(self._hash, 0, size)
                body = file_range_body(self._fd, 0, size)
                if await self._storage._done_in_bucket(
                    lambda: self._client.put_object(self.key, body, sha256=sha256)
                ):
                    self._storage.bucket_writes += 1
                    self._storage.log.info(
                        "stored {digest} in the bucket (one PUT)", digest=str(self.digest)
                    )
                return
            while not self.failed and self.sent < size:
                await self._send_part(min(self._storage.part_size, size - self.sent))
            if self.failed:
                await self._abort()
                self._storage._bucket_failed(self.failed)
                return
            assert self._upload_id is not None
            upload_id = self._upload_id
            done = await self._storage._done_in_bucket(
                lambda: self._client.complete_multipart(self.key, upload_id, self._etags)
            )
            if not done:
                await self._abort()
                return
            self._storage.bucket_writes += 1
            self._storage.log.info(
                "stored {digest} in the bucket ({parts} parts)",
                digest=str(self.digest),
                parts=len(self._etags),
            )
        except Exception as e:
            self._storage.log.failure("uploading {key} to the bucket", Failure(), key=self.key)
            self.failed = e
        finally:
            self._close()

    def abort(self) -> Deferred[None]:
        """The fill was cut or did not verify: nothing of it may complete."""
        return ensureDeferred(self._abort_when_idle())

    async def _abort_when_idle(self) -> None:
        self._skip = True
        while self._busy is not None:
            await self._busy
        await self._abort()
        self._close()

    async def _abort(self) -> None:
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                await self._client.abort_multipart(self.key, upload_id)
            except S3Error as e:
                # Left for clean_uploads.
                self._storage.log.warn("{error}; the upload is cleaned up later", error=str(e))

    def _close(self) -> None:
        self.finished = True
        self._storage.uploads.discard(self)
        if not self.done.called:
            self.done.callback(None)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@implementer(IStagedBlob)
class _TieredStaged:
    """The local tier's staged file, whose bytes also stream into the bucket."""

    def __init__(self, local: StagedFile, upload: _Upload) -> None:
        self._local = local
        self.upload = upload

    @property
    def written(self) -> int:
        return self._local.written

    @property
    def failure(self) -> OSError | None:
        return self._local.failure

    def append(self, data: bytes, on_disk: bool = False) -> None:
        self._local.append(data, on_disk)
        self.upload.progress(self._local.written)

    def wake_on_progress(self, seen: int, callback: Callable[[], None]) -> None:
        def woken() -> None:
            self.upload.progress(self._local.written)
            callback()

        self._local.wake_on_progress(seen, woken)

    def read(self, offset: int, length: int) -> bytes:
        return self._local.read(offset, length)

    def ahead(self) -> Any:
        # Segments write ahead into the local file; the bucket's parts are
        # read back from it only below what is written and hashed in order.
        return self._local.ahead()

    def seal(self) -> Deferred[str]:
        return self._local.seal()

    def commit(self, digest: Digest, size: int, pinned: bool = False) -> Deferred[bool]:
        stored = self._local.commit(digest, size, pinned)
        # The bucket's copy is completed in the background: the client's
        # response does not wait for the bucket.
        self.upload.commit(size)
        if pinned:
            storage = self.upload.storage
            ensureDeferred(storage._mark_pinned(BLOB, str(digest), True))
        return stored

    def abort(self) -> None:
        self._local.abort()
        self.upload.abort()

    def close(self) -> None:
        self._local.close()


def _producer(protocol: Protocol) -> IPushProducer:
    """A response body's transport, which is a push producer."""
    transport = protocol.transport
    assert transport is not None
    return IPushProducer(transport)


def _tag_entry(body: bytes) -> TagEntry | None:
    try:
        value = json.loads(body)
        return TagEntry(
            str(value["digest"]),
            str(value["media_type"]),
            int(value["size"]),
            float(value["checked_at"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _parse_time(text: str) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


_DONE = Failure(ResponseDone())


class _IntoStaged(Protocol):
    """A bucket response's body into a staged blob, pausing while the disk is behind."""

    def __init__(
        self,
        staged: IStagedBlob,
        done: Deferred[int],
        progress: Callable[[], None] = lambda: None,
    ) -> None:
        self._staged = staged
        self._done = done
        self._progress = progress
        self.received = 0
        self._paused = False

    def dataReceived(self, data: bytes) -> None:
        self._staged.append(data)
        self.received += len(data)
        self._progress()
        if not self._paused and self.received - self._staged.written > _AHEAD:
            self._paused = True
            _producer(self).pauseProducing()
            self._staged.wake_on_progress(self._staged.written, self._caught_up)

    def _caught_up(self) -> None:
        if self.received - self._staged.written > _AHEAD and self._staged.failure is None:
            self._staged.wake_on_progress(self._staged.written, self._caught_up)
            return
        self._paused = False
        _producer(self).resumeProducing()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if reason.check(ResponseDone):
            self._done.callback(self.received)
        else:
            self._done.errback(reason)


class _Collect(Protocol):
    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self._done = done
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            _producer(self).stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._size > self._limit:
            self._done.errback(ValueError(f"larger than {self._limit} bytes"))
        elif reason.check(ResponseDone):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        _producer(self).stopProducing()


# A manifest is at most 4 MiB (distribution's limit).
_MANIFEST_LIMIT = 4 << 20


def _content(response: IResponse) -> Deferred[bytes]:
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_Collect(done, _MANIFEST_LIMIT))
    return done
