"""
The disk backend: blobs, manifests and tag answers in a local directory,
kept by diskcache, with eviction by our own index (L{ContentIndex}).

Layout of the cache directory::

    tmp/     blobs being staged; emptied at startup
    store/   the diskcache database and the blob files it owns
    index.sqlite  sizes, access times and pins, for eviction (L{ContentIndex})
    running  present while txregistry runs: found at startup, it means the
             last run did not stop cleanly, and the store is checked

A blob is staged in C{tmp/} (L{txregistry.storage.staging}), and only once
its owner has checked its size and digest is its file I{moved} (not copied)
into diskcache's tree by L{_MovingDisk}; a hit is then checked against the
size it was stored with before it is served.  Every diskcache and index
call blocks, so all of them go through the runner.

A failing disk never fails a request: a lookup that fails is a miss, a
store that fails is skipped, and the backend reports itself degraded (one
log line per change of state) until something is stored again.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import diskcache
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txregistry.oci.reference import Digest
from txregistry.storage.disk_index import ContentIndex
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
from txregistry.storage.staging import InlineSpool, SpoolFactory, StagedFile

T = TypeVar("T")
# What a tag answer counts for against the size limit: its key and fields.
_TAG_SIZE = 512


@dataclass(frozen=True)
class _VerifiedFile:
    """A complete, checked blob file, ready to be moved into the cache."""

    path: str
    size: int


class _MovingDisk(diskcache.Disk):  # type: ignore[misc]
    """
    A diskcache C{Disk} that takes a L{_VerifiedFile} by renaming it into the
    cache directory, so that committing a 1 GiB blob costs one C{rename}.
    (A custom C{Disk} is diskcache's documented way to change how values
    are stored.)
    """

    def store(self, value: Any, read: bool, key: Any = diskcache.UNKNOWN) -> Any:
        if isinstance(value, _VerifiedFile):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            os.rename(value.path, full_path)
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)


class LocalFile:
    """A stored blob's open file, served as a complete L{ByteSource} with one reference."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file = file
        self._size = size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset)

    def fileno(self) -> int:
        """The open file (the S3 tier uploads a local blob the bucket lacks from it)."""
        return self._file.fileno()

    def available(self) -> int:
        return self._size

    def is_complete(self) -> bool:
        return True

    def failure(self) -> Failure | None:
        return None

    def subscribe(self, reader: Reader) -> None:
        pass

    def unsubscribe(self, reader: Reader) -> None:
        pass

    def release(self) -> None:
        self._file.close()


def _key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


@implementer(IStorage)
class DiskStorage:
    """
    Content by digest, and tag answers, in a directory.

    Until L{start} succeeds the backend is unavailable: every lookup misses
    and nothing is stored, so requests are still served, straight from
    upstream.

    @ivar crashed: whether the last run ended without closing the store.
    """

    name = "disk"
    log = Logger()

    def __init__(
        self,
        directory: Path,
        size_limit: int,
        run_blocking: BlockingRunner,
        spools: SpoolFactory = InlineSpool,
        now: Callable[[], float] = time.time,
    ) -> None:
        """
        @param spools: how staged blobs are written and hashed: on threads
            of their own in the service, inline in tests that drive the
            reactor by hand.
        @param now: the time of an access, for the order of eviction.
        """
        self.directory = directory
        self.size_limit = size_limit
        self._run = run_blocking
        self._spools = spools
        self._now = now
        self._cache: diskcache.Cache | None = None
        self._index: ContentIndex | None = None
        self.problem: str | None = "not opened yet"
        self.evictions = 0
        self.corrupt_removed = 0
        self._corrupt_lock = threading.Lock()
        self.crashed = False
        self.figures = StorageFigures()
        # Answers counted since they were last written to the index.
        self._unwritten_hits = 0
        self._unwritten_misses = 0
        self._exclusive = True

    @property
    def status(self) -> str:
        if self._cache is None:
            return "unavailable"
        return "degraded" if self.problem else "ok"

    @property
    def tmp_directory(self) -> Path:
        return self.directory / "tmp"

    def start(self) -> None:
        """
        Open the store, and after an unclean stop, check it in the
        background (it serves meanwhile: see L{repair}).
        """
        self.open()
        if self.crashed and self._cache is not None:
            self.repair()

    def open(self, exclusive: bool = True) -> None:
        """
        Create the directories, remove downloads left by a previous run, and
        open diskcache and the index.

        @param exclusive: false for the command line, which works on the
            cache beside a running service: it then only opens the store
            (which is safe across processes), and leaves the downloads and
            the C{running} marker alone.
        """
        self._exclusive = exclusive
        try:
            if exclusive:
                self.tmp_directory.mkdir(parents=True, exist_ok=True)
                for leftover in self.tmp_directory.iterdir():
                    leftover.unlink()
                self.crashed = self._running_marker.exists()
                self._running_marker.touch()
            elif not (self.directory / "store").is_dir():
                raise OSError(f"no cache in {self.directory}")
            cache = diskcache.Cache(
                str(self.directory / "store"),
                disk=_MovingDisk,
                # Eviction is ours (see evict_to_limit), by the index.
                eviction_policy="none",
                size_limit=1 << 62,
                cull_limit=0,
                # Off: diskcache's statistics count every lookup, failed
                # requests included, and cost a write each; the hit ratio is
                # counted per answer instead (count_answer).
                statistics=0,
            )
            # Beside diskcache's directory, not in it: its check(fix) removes
            # every file it does not know.
            index_path = self.directory / "index.sqlite"
            adopting = not index_path.exists()
            index = ContentIndex(index_path)
            if adopting:
                # A cache from before the index, or one whose index was lost.
                self._adopt(cache, index)
        except Exception as e:
            self.problem = f"cannot open the cache in {self.directory}: {e}"
            self.log.error("{problem}; serving without a cache", problem=self.problem)
            return
        self._cache, self._index = cache, index
        self.problem = None

    def stop(self) -> None:
        self.close()

    def close(self) -> None:
        hits, misses = self._take_unwritten()
        if self._index is not None and (hits or misses):
            try:
                self._index.add_answers(hits, misses)
            except Exception as e:
                self.log.warn(
                    "the last {count} answers are not counted in the hit ratio: {error}",
                    count=hits + misses,
                    error=str(e),
                )
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._exclusive:
            self._running_marker.unlink(missing_ok=True)

    @property
    def _running_marker(self) -> Path:
        return self.directory / "running"

    def report_problem(self, problem: str) -> None:
        if self.problem is None:
            self.log.error("cache degraded: {problem}; serving without caching", problem=problem)
        self.problem = problem

    def _report_healthy(self) -> None:
        if self.problem is not None and self._cache is not None:
            self.log.info("cache healthy again: storing what is fetched")
            self.problem = None

    def describe(self) -> dict[str, Any]:
        description: dict[str, Any] = {
            "backend": self.name,
            "directory": str(self.directory),
            "status": self.status,
        }
        if self.problem is not None:
            description["problem"] = self.problem
        if self.corrupt_removed:
            description["corrupt_removed"] = self.corrupt_removed
        return description

    # Blobs.

    def can_stage(self, size: int | None) -> bool:
        if self._cache is None:
            return False
        if size is not None and size > self.size_limit:
            self.log.info(
                "a blob of {size} bytes is larger than the cache; streaming it uncached",
                size=size,
            )
            return False
        return True

    def stage_blob(self, digest: Digest) -> IStagedBlob:
        try:
            fd, path = tempfile.mkstemp(
                prefix=f"{digest.algorithm}-{digest.hex[:16]}.",
                suffix=".partial",
                dir=self.tmp_directory,
            )
        except OSError as e:
            self.report_problem(f"cannot create a download file: {e.strerror or e}")
            raise
        return StagedFile(fd, path, digest.hasher(), self._spools, self._commit_staged, self._run)

    def _commit_staged(
        self, staged: StagedFile, digest: Digest, size: int, pinned: bool
    ) -> Deferred[bool]:
        stored = self._write(self._commit_blob, digest, staged.path, size, pinned)

        def done(evicted: int | None) -> bool:
            if evicted is None:
                return False
            self._report_healthy()
            return True

        return stored.addCallback(done)

    def _commit_blob(
        self, cache: diskcache.Cache, digest: Digest, path: str, size: int, pinned: bool
    ) -> int:
        with open(path, "rb") as f:
            # The entry must not point at data still only in the page cache.
            os.fsync(f.fileno())
        key = _key(BLOB, str(digest))
        # diskcache's tag column holds the verified size, which lets a hit
        # be checked against its file without reading it.
        cache.set(key, _VerifiedFile(path, size), tag=size)
        return self._added(cache, key, size, pinned)

    def open_blob(self, digest: Digest, touch: bool = True) -> Deferred[StoredBlob | None]:
        return self._read(self._open_blob, digest, touch)

    def _open_blob(self, cache: diskcache.Cache, digest: Digest, touch: bool) -> StoredBlob | None:
        key = _key(BLOB, str(digest))
        file, size = cache.get(key, read=True, tag=True)
        if file is None:
            self._forget_missing(key)
            return None
        actual = os.fstat(file.fileno()).st_size
        if not isinstance(size, int) or actual != size:
            # A file cut short (or grown) on disk must never be served.
            file.close()
            self._drop_corrupt(
                cache, key, f"its file holds {actual} bytes, not the {size} it was stored with"
            )
            return None
        if touch:
            self._touch(key)
        return StoredBlob(LocalFile(file, size), size)

    # Manifests.

    def get_manifest(self, digest: Digest, touch: bool = True) -> Deferred[StoredManifest | None]:
        return self._read(self._get_manifest, digest, touch)

    def _get_manifest(
        self, cache: diskcache.Cache, digest: Digest, touch: bool
    ) -> StoredManifest | None:
        key = _key(MANIFEST, str(digest))
        try:
            value = cache.get(key)
            if value is None:
                self._forget_missing(key)
                return None
            media_type, body = value
            manifest = StoredManifest(media_type, body)
        except (ValueError, TypeError, EOFError, OSError, pickle.UnpicklingError) as e:
            # A corrupt entry is a miss, and is removed.
            self._drop_corrupt(cache, key, f"it cannot be read back ({e})")
            return None
        # A manifest is small: checking its digest on every read costs
        # little, and means a changed one is never served (not even by size).
        hasher = digest.hasher()
        hasher.update(body)
        if hasher.hexdigest() != digest.hex:
            self._drop_corrupt(cache, key, f"its {len(body)} bytes do not match its digest")
            return None
        if touch:
            self._touch(key)
        return manifest

    def put_manifest(
        self, digest: Digest, manifest: StoredManifest, pinned: bool = False
    ) -> Deferred[bool]:
        value = (manifest.media_type, manifest.body)
        return self._stored(
            self._write(
                self._put_value, _key(MANIFEST, str(digest)), value, len(manifest.body), pinned
            )
        )

    # Tags.

    def get_tag(self, key: str) -> Deferred[TagEntry | None]:
        return self._read(self._get_tag, key)

    def _get_tag(self, cache: diskcache.Cache, name: str) -> TagEntry | None:
        key = _key(TAG, name)
        try:
            value = cache.get(key)
            if value is None:
                self._forget_missing(key)
                return None
            entry = TagEntry(*value)
        except (ValueError, TypeError, EOFError, OSError):
            self._delete(cache, key)
            return None
        self._touch(key)
        return entry

    def put_tag(self, key: str, entry: TagEntry, pinned: bool = False) -> Deferred[bool]:
        value = (entry.digest, entry.media_type, entry.size, entry.checked_at)
        return self._stored(self._write(self._put_value, _key(TAG, key), value, _TAG_SIZE, pinned))

    def _put_value(
        self, cache: diskcache.Cache, key: str, value: Any, size: int, pinned: bool
    ) -> int:
        cache.set(key, value)
        return self._added(cache, key, size, pinned)

    def _stored(self, written: Deferred[int | None]) -> Deferred[bool]:
        return written.addCallback(lambda evicted: evicted is not None)

    # Entries, eviction and pins.

    def _added(self, cache: diskcache.Cache, key: str, size: int, pinned: bool) -> int:
        """Index a new entry, then evict to make room for it; how many were evicted."""
        assert self._index is not None
        self._index.add(key, size, self._now(), pinned)
        return self._evict(cache)

    def _touch(self, key: str) -> None:
        if self._index is not None:
            self._index.touch(key, self._now())

    def _forget_missing(self, key: str) -> None:
        """diskcache has no such entry: the index must not count it."""
        if self._index is not None and self._index.known(key):
            self._index.remove(key)

    def _delete(self, cache: diskcache.Cache, key: str) -> None:
        if self._index is not None:
            self._index.remove(key)
        cache.delete(key)

    def _cache_now(self) -> diskcache.Cache:
        if self._cache is None:
            raise OSError(self.problem or "the cache is not open")
        return self._cache

    def _evict(self, cache: diskcache.Cache) -> int:
        """Evict least recently used, unpinned entries, one at a time, until within the limit."""
        assert self._index is not None
        evicted = 0
        while self._index.totals()[0] > self.size_limit:
            key = self._index.least_recently_used()
            if key is None:
                break
            self._delete(cache, key)
            evicted += 1
        self.evictions += evicted
        return evicted

    def evict_to_limit(self) -> Deferred[int]:
        return self._write(self._evict).addCallback(lambda evicted: evicted or 0)

    def remove(self, kind: str, name: str) -> Deferred[bool]:
        def remove(cache: diskcache.Cache) -> bool:
            key = _key(kind, name)
            present = key in cache
            self._delete(cache, key)
            return present

        return self._write(remove).addCallback(bool)

    def drop_corrupt(self, kind: str, name: str, problem: str) -> Deferred[bool]:
        return self._write(self._drop_corrupt, _key(kind, name), problem).addCallback(bool)

    def _drop_corrupt(self, cache: diskcache.Cache, key: str, problem: str) -> bool:
        where = self._where(cache, key)
        present = key in cache
        self._delete(cache, key)
        with self._corrupt_lock:
            self.corrupt_removed += 1
        if self._index is not None:
            self._index.add_corrupt(1)
        kind, _, name = key.partition("/")
        self.log.warn(
            "removed corrupt cache {kind} {digest} ({path}): {problem};"
            " it is fetched from the upstream again when pulled",
            kind=kind,
            digest=name,
            path=where,
            problem=problem,
        )
        return present

    def _where(self, cache: diskcache.Cache, key: str) -> str:
        """The file an entry is kept in, for a log line; small values live in the database."""
        try:
            value = cache.get(key, read=True)
        except Exception:
            value = None
        name = getattr(value, "name", None)
        if hasattr(value, "close"):
            value.close()
        if isinstance(name, str):
            return name
        return str(self.directory / "store" / diskcache.core.DBNAME)

    def pin(self, kind: str, name: str, pinned: bool) -> Deferred[bool]:
        def pin(cache: diskcache.Cache) -> bool:
            assert self._index is not None
            changed = self._index.pin(_key(kind, name), pinned)
            if not pinned:
                self._evict(cache)
            return changed

        return self._write(pin).addCallback(bool)

    def entries(self, kind: str) -> Deferred[list[str]]:
        def names(cache: diskcache.Cache) -> list[str]:
            assert self._index is not None
            prefix = f"{kind}/"
            return [key[len(prefix) :] for key in self._index.keys(prefix)]

        return self._read(names).addCallback(lambda names: names or [])

    def pinned(self, kind: str) -> Deferred[dict[str, float]]:
        def pinned(cache: diskcache.Cache) -> dict[str, float]:
            assert self._index is not None
            prefix = f"{kind}/"
            return {key[len(prefix) :]: t for key, t in self._index.pinned(prefix).items()}

        return self._read(pinned).addCallback(lambda found: found or {})

    def count_answer(self, from_cache: bool) -> None:
        if from_cache:
            self._unwritten_hits += 1
        else:
            self._unwritten_misses += 1

    def _take_unwritten(self) -> tuple[int, int]:
        """
        The answers counted since the last write, now to be written; called
        on the reactor thread.  A write that fails loses them: they are
        statistics, and the disk is failing.
        """
        counts = self._unwritten_hits, self._unwritten_misses
        self._unwritten_hits = self._unwritten_misses = 0
        return counts

    def update_figures(self) -> Deferred[None]:
        hits, misses = self._take_unwritten()

        def figures(cache: diskcache.Cache) -> StorageFigures:
            assert self._index is not None
            if hits or misses:
                self._index.add_answers(hits, misses)
            return StorageFigures(
                *self._index.totals(), *self._index.answers(), self._index.corrupt()
            )

        def keep(figures: StorageFigures | None) -> None:
            if figures is not None:
                self.figures = figures

        return self._read(figures).addCallback(keep)

    # Upkeep.

    def repair(self) -> Deferred[int | None]:
        """
        After a crash: remove files that no entry names (a crash between a
        blob being moved into the store and its entry being written) and
        entries whose file is gone, and bring the index in line.  Entries
        are only ever written after their file is complete, so nothing else
        can be half-done.
        """
        return self._write(self._repair)

    def _repair(self, cache: diskcache.Cache) -> int:
        # check() records its findings as warnings and returns them.
        problems = cache.check(fix=True)
        fixed = [
            str(w.message)
            for w in problems
            if str(w.message).startswith(("unknown file", "file not found"))
        ]
        assert self._index is not None
        self._index.keep_only(str(key) for key in cache.iterkeys())
        self._adopt(cache, self._index)
        self.log.info(
            "checked the cache after an unclean stop: {count} problems fixed", count=len(fixed)
        )
        return len(fixed)

    def _adopt(self, cache: diskcache.Cache, index: ContentIndex) -> None:
        """Index the entries diskcache holds that the index does not know."""
        now = self._now()
        for raw in cache.iterkeys():
            key = str(raw)
            if index.known(key):
                continue
            kind = key.split("/", 1)[0]
            if kind == BLOB:
                _, size = cache.get(key, read=True, tag=True, default=(None, None))
                size = size if isinstance(size, int) else 0
            elif kind == MANIFEST:
                value = cache.get(key)
                size = len(value[1]) if value else 0
            else:
                size = _TAG_SIZE
            index.add(key, size, now)

    # Running blocking calls.

    def _read(self, f: Callable[..., T], *args: Any) -> Deferred[T | None]:
        """Run a lookup through the runner; a failed lookup is a miss."""
        return self._call(f, args, write=False)

    def _write(self, f: Callable[..., T], *args: Any) -> Deferred[T | None]:
        """Run a store through the runner; a failed store is skipped."""
        return self._call(f, args, write=True)

    def _call(self, f: Callable[..., T], args: tuple[Any, ...], write: bool) -> Deferred[T | None]:
        cache = self._cache
        if cache is None:
            return succeed(None)

        def failed(failure: Failure) -> None:
            operation = getattr(f, "__name__", "operation").strip("_").replace("_", " ")
            problem = f"{operation} failed: {failure.getErrorMessage()}"
            if write:
                self.report_problem(problem)
            else:
                self.log.warn("cache {problem}; treating it as a miss", problem=problem)
            return None

        result: Deferred[T | None] = self._run(f, cache, *args)
        return result.addErrback(failed)
