"""
What the repositories ask of a storage backend.

A backend keeps three kinds of content, each under a key of its own:

 - blobs, by digest, written through a staged writer (L{IStagedBlob}):
   bytes in, then committed under their verified digest, or aborted, so
   that nothing partial or unverified is ever stored;
 - manifests, by digest, as their exact bytes and media type;
 - tag answers (L{TagEntry}), with the time the upstream last confirmed
   them.

Reading a blob gives a L{StoredBlob}: a L{ByteSource} that the HTTP layer
serves with flow control and ranges, never a file descriptor.  Eviction is
the backend's business: it keeps the access times it needs and never
evicts pinned content (what clients pushed to a hosted repository).

Every call that may block (disk, database, network) returns a L{Deferred}
and runs through the backend's one L{txregistry.storage.runner} runner,
never on the reactor thread.  A failing backend never fails a request: a
lookup that fails is a miss, a write that fails is skipped, and the backend
reports itself degraded.

L{tests.unit.storage} holds the contract tests every backend must pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from txregistry.oci.reference import Digest

BLOB = "blob"
MANIFEST = "manifest"
TAG = "tag"
KINDS = (BLOB, MANIFEST, TAG)


class Reader(Protocol):
    """Someone reading a L{ByteSource} at its own pace."""

    @property
    def offset(self) -> int:
        """How far it has read."""

    def more_data(self) -> None:
        """The source has more, has completed, or has failed."""


class ByteSource(Protocol):
    """
    A file that senders read, which may still be growing (a download in
    progress) or be complete (a stored blob).

    It is reference counted: whoever hands a source to someone takes a
    reference for them, and every holder calls L{release} once.  Whatever
    the source holds open is closed with the last reference.
    """

    def read(self, offset: int, length: int) -> bytes:
        """Up to C{length} bytes from C{offset}, which is below L{available}."""

    def available(self) -> int:
        """How many bytes, from the start of the file, may be sent now."""

    def is_complete(self) -> bool:
        """Whether L{available} is the whole file and will not grow."""

    def failure(self) -> Failure | None:
        """Why the file will never be complete, if it won't."""

    def subscribe(self, reader: Reader) -> None:
        """Call C{reader.more_data()} whenever there is news."""

    def unsubscribe(self, reader: Reader) -> None: ...

    def release(self) -> None:
        """Drop one reference."""


@dataclass
class StoredBlob:
    """A verified blob from storage, to be served; its receiver releases C{source}."""

    source: ByteSource
    size: int


@dataclass(frozen=True)
class StoredManifest:
    media_type: str
    body: bytes


@dataclass(frozen=True)
class TagEntry:
    """
    What a tag meant when the upstream last told us, and when that was.

    @ivar checked_at: the clock time of the last answer from upstream, in
        seconds since the epoch, so that it survives a restart.
    """

    digest: str
    media_type: str
    size: int
    checked_at: float


@dataclass(frozen=True)
class StorageFigures:
    """
    How much a backend holds, for metrics and C{/health}; refreshed by
    L{IStorage.update_figures}, so that reading it never blocks.
    """

    size: int = 0
    entries: int = 0
    pinned_size: int = 0
    pinned_entries: int = 0
    # For the hit ratio: manifests and blobs answered from the cache (HIT or
    # STALE) and from the upstream (MISS), since the cache was created.
    # Errors count as neither (see L{IStorage.count_answer}).
    hits: int = 0
    misses: int = 0
    # Entries removed for failing a check (wrong size, wrong digest), since
    # the cache was created (see L{IStorage.drop_corrupt}).
    corrupt_removed: int = 0


class IStagedBlob(Interface):
    """
    A blob being written: bytes are appended in order, written and hashed
    off the reactor thread, and readable back as soon as they are written.
    Once L{seal}ed and checked by its owner, it is L{commit}ted under its
    digest, or L{abort}ed.
    """

    written = Attribute(
        "How many bytes, from the start, are written and hashed: the writer's"
        " caller need not keep them in memory any more."
    )
    failure = Attribute("Why writing stopped (an OSError), if it did; hashing goes on.")

    def append(data: bytes, on_disk: bool = False) -> None:
        """
        Write and hash C{data} after everything appended before it; only
        hash it if it is C{on_disk} already, written in place by an
        C{ahead} file.
        """

    def wake_on_progress(seen: int, callback: Callable[[], None]) -> None:
        """
        Call C{callback}, once, in the reactor thread, as soon as
        L{written} is past C{seen} or writing has failed.
        """

    def read(offset: int, length: int) -> bytes:
        """Up to C{length} written bytes from C{offset}, below L{written}."""

    def ahead() -> Any:
        """
        An C{AheadFile} (L{txregistry.storage.staging}): C{write_at} and
        C{read_at} any offset of this blob's file, off the reactor thread,
        for the segments of a download that arrive before their turn.
        """

    def seal() -> Deferred[str]:
        """Finish writing: fires with the hex digest of everything appended."""

    def commit(digest: Digest, size: int, pinned: bool = False) -> Deferred[bool]:
        """
        Store the sealed bytes as blob C{digest}, which its caller has
        verified.  Fires with whether they were stored; if not, they can
        still be read until L{close}.
        """

    def abort() -> None:
        """Drop what was written; nothing of it is ever stored."""

    def close() -> None:
        """Let go of what reading back needs; called once, by the last reader."""


class IStorage(Interface):
    """A storage backend: content by digest, tag answers, and their upkeep."""

    name = Attribute("The backend's kind, as in the configuration: C{disk}, C{s3}.")
    status = Attribute("C{ok}, C{degraded} (reads work, writes fail) or C{unavailable}.")
    problem = Attribute("What is wrong, in a sentence with no secrets, or None.")
    evictions = Attribute("How many entries were evicted to keep within the size limit.")
    corrupt_removed = Attribute(
        "How many entries were removed since start for failing a check (wrong size or digest)."
    )
    figures = Attribute("The L{StorageFigures} of the last L{update_figures}.")

    def start() -> None:
        """Open the backend; called once, before the reactor runs."""

    def stop() -> None:
        """Close it, once nothing uses it any more."""

    def report_problem(problem: str) -> None:
        """Writing failed elsewhere (a staged blob's file): report it once, as degraded."""

    def describe() -> dict[str, Any]:
        """The backend's state for C{/health}, with no secrets."""

    def can_stage(size: int | None) -> bool:
        """Whether a blob of C{size} bytes (or unknown) may be staged and stored."""

    def stage_blob(digest: Digest) -> IStagedBlob:
        """
        Start writing a blob.

        @raise OSError: nothing can be written now; the backend is degraded.
        """

    def open_blob(digest: Digest, touch: bool = True) -> Deferred[StoredBlob | None]:
        """
        A stored blob, checked to have the size it was stored with, or None:
        one of the wrong size is dropped as corrupt (L{drop_corrupt}).

        @param touch: whether this read counts as a use for eviction; upkeep
            (the scrub, C{cache verify}) reads with C{False}, so that
            re-hashing everything does not reorder what is evicted first.
        """

    def get_manifest(digest: Digest, touch: bool = True) -> Deferred[StoredManifest | None]:
        """
        A stored manifest, checked against its digest on every read (it is
        small), or None: one that fails is dropped as corrupt.
        """

    def put_manifest(
        digest: Digest, manifest: StoredManifest, pinned: bool = False
    ) -> Deferred[bool]:
        """Store a manifest whose bytes have C{digest}; fires with whether it was stored."""

    def get_tag(key: str) -> Deferred[TagEntry | None]: ...

    def put_tag(key: str, entry: TagEntry, pinned: bool = False) -> Deferred[bool]: ...

    def remove(kind: str, name: str) -> Deferred[bool]:
        """Remove one entry (C{kind} is L{BLOB}, L{MANIFEST} or L{TAG}), pinned or not."""

    def drop_corrupt(kind: str, name: str, problem: str) -> Deferred[bool]:
        """
        Remove an entry that failed a check, log it with its digest, where
        it was kept and C{problem}, and count it in L{corrupt_removed} and
        the figures; fires with whether it was there.
        """

    def pin(kind: str, name: str, pinned: bool) -> Deferred[bool]:
        """Pin an entry, so that eviction never removes it, or unpin it."""

    def update_figures() -> Deferred[None]:
        """Refresh L{figures}, writing the answers counted since the last time."""

    def count_answer(from_cache: bool) -> None:
        """
        Count one manifest or blob answered with content, from the cache or
        from the upstream, for the hit ratio.  It never blocks: the count is
        kept with the cache by the next L{update_figures} or L{stop}.
        """

    def entries(kind: str) -> Deferred[list[str]]:
        """The names of every entry of one kind, for upkeep."""

    def pinned(kind: str) -> Deferred[dict[str, float]]:
        """
        The pinned entries of one kind, each with the clock time it was last
        stored or read, for C{txregistry cache gc}'s grace period.
        """

    def evict_to_limit() -> Deferred[int]:
        """Evict least recently used, unpinned entries until within the limit; how many."""
