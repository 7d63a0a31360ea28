"""
The disk cache: blobs, manifests and tag answers, kept in diskcache.

Layout of the cache directory::

    tmp/     downloads in progress; emptied at startup
    store/   the diskcache database and the blob files it owns
    running  present while txregistry runs: found at startup, it means the
             last run did not stop cleanly, and the store is checked

A blob is downloaded into C{tmp/}, hashed as it arrives, and only once its
size and digest have been checked is its file I{moved} (not copied) into
diskcache's tree by L{_MovingDisk}.  diskcache then owns it: it counts its
size against the limit and deletes it when it evicts it, least recently used
first.  Every diskcache call blocks, so all of them go through the
C{run_blocking} callable, which in the service runs them in a thread pool of
their own.

A failing cache never fails a request: a lookup that fails is a miss, a
store that fails is skipped, and the store reports itself degraded (one log
line per change of state) until a blob is stored again.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import diskcache
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txregistry.oci.reference import Digest

T = TypeVar("T")


class BlockingRunner(Protocol):
    """Runs a blocking call somewhere it cannot stall the reactor."""

    def __call__(self, f: Callable[..., T], /, *args: Any) -> Deferred[T]: ...


@dataclass(frozen=True)
class _VerifiedFile:
    """A complete, checked blob file, ready to be moved into the cache."""

    path: str
    size: int


class _MovingDisk(diskcache.Disk):  # type: ignore[misc]
    """
    A diskcache C{Disk} that takes a L{_VerifiedFile} by renaming it into the
    cache directory, so that committing a 1 GiB blob costs one C{rename}.
    """

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, _VerifiedFile):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            os.rename(value.path, full_path)
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)


@dataclass
class CachedBlob:
    """An open, verified blob file from the cache."""

    file: IO[bytes]
    size: int


@dataclass(frozen=True)
class CachedManifest:
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


_LEAST_RECENTLY_USED = diskcache.core.EVICTION_POLICY["least-recently-used"]["cull"]


def _evict_to_limit(cache: diskcache.Cache) -> int:
    """
    Evict the least recently used entries, one at a time, until the cache is
    under its size limit; return how many.

    diskcache's own cull() evicts ten at a time, which with blobs of a GiB
    throws away far more than needed.  This uses diskcache's own query for
    its least-recently-used order, through its connection (C{_sql}).
    """
    evicted = 0
    select = _LEAST_RECENTLY_USED.format(fields="key, raw", now=0)
    while cache.volume() > cache.size_limit:
        with cache.transact():
            rows = cache._sql(select, (1,)).fetchall()
            if not rows:
                break
            ((db_key, raw),) = rows
            cache.delete(cache._disk.get(db_key, raw))
        evicted += 1
    return evicted


def _blob_key(digest: Digest) -> str:
    return f"blob/{digest}"


def _manifest_key(digest: Digest) -> str:
    return f"manifest/{digest}"


class CacheStore:
    """
    Cached content by digest, and tag answers, on disk.

    Until L{open} succeeds the store is unavailable: every lookup misses and
    nothing is stored, so requests are still served, straight from upstream.

    @ivar evictions: entries evicted to keep under the size limit.
    @ivar crashed: whether the last run ended without closing the store.
    """

    log = Logger()

    def __init__(self, directory: Path, size_limit: int, run_blocking: BlockingRunner) -> None:
        self.directory = directory
        self.size_limit = size_limit
        self._run = run_blocking
        self._cache: diskcache.Cache | None = None
        self.problem: str | None = "not opened yet"
        self.evictions = 0
        self.crashed = False
        self._exclusive = True
        # Refreshed by update_figures(), for metrics and stats.
        self.last_volume = 0
        self.last_entries = 0

    @property
    def available(self) -> bool:
        """Whether the cache is open; it may still be degraded."""
        return self._cache is not None

    @property
    def status(self) -> str:
        """C{ok}, C{degraded} (open, but writes fail) or C{unavailable}."""
        if self._cache is None:
            return "unavailable"
        return "degraded" if self.problem else "ok"

    @property
    def tmp_directory(self) -> Path:
        return self.directory / "tmp"

    def open(self, exclusive: bool = True) -> None:
        """
        Create the directories, remove downloads left by a previous run, and
        open diskcache.  Called once at startup, before the reactor runs.

        @param exclusive: false for the command line, which works on the
            cache beside a running service: it then only opens diskcache
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
            self._cache = diskcache.Cache(
                str(self.directory / "store"),
                disk=_MovingDisk,
                size_limit=self.size_limit,
                eviction_policy="least-recently-used",
                # Eviction is done by _evict_to_limit, after each store.
                cull_limit=0,
                # Hits and misses, kept across restarts, for "cache stats".
                statistics=1,
            )
        except Exception as e:
            self.problem = f"cannot open the cache in {self.directory}: {e}"
            self.log.error("{problem}; serving without a cache", problem=self.problem)
            return
        self.problem = None

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            if self._exclusive:
                self._running_marker.unlink(missing_ok=True)

    @property
    def _running_marker(self) -> Path:
        return self.directory / "running"

    def report_problem(self, problem: str) -> None:
        """Writing to the cache failed: say so, once per change of state."""
        if self.problem is None:
            self.log.error("cache degraded: {problem}; serving without caching", problem=problem)
        self.problem = problem

    def _report_healthy(self) -> None:
        if self.problem is not None and self._cache is not None:
            self.log.info("cache healthy again: storing what is fetched")
            self.problem = None

    # Blobs.

    def new_temp_file(self, digest: Digest) -> tuple[int, str]:
        """
        Create a file for a download in progress: an open file descriptor
        (for reading and writing) and its path.

        @raise OSError: the file cannot be created; the store is degraded.
        """
        try:
            return tempfile.mkstemp(
                prefix=f"{digest.algorithm}-{digest.hex[:16]}.",
                suffix=".partial",
                dir=self.tmp_directory,
            )
        except OSError as e:
            self.report_problem(f"cannot create a download file: {e.strerror or e}")
            raise

    def open_blob(self, digest: Digest) -> Deferred[CachedBlob | None]:
        return self._read(self._open_blob, digest)

    def _open_blob(self, cache: diskcache.Cache, digest: Digest) -> CachedBlob | None:
        key = _blob_key(digest)
        file, size = cache.get(key, read=True, tag=True)
        if file is None:
            return None
        if not isinstance(size, int) or os.fstat(file.fileno()).st_size != size:
            # A file cut short on disk must never be served.
            file.close()
            cache.delete(key)
            self.log.warn(
                "removed cache entry {digest}: its file has the wrong size", digest=str(digest)
            )
            return None
        return CachedBlob(file, size)

    def commit_blob(self, digest: Digest, path: str, size: int) -> Deferred[bool]:
        """
        Move a verified download into the cache.  Fires with whether it was
        stored; if not, the file is still at C{path}.
        """
        stored = self._write(self._commit_blob, digest, path, size)

        def done(evicted: int | None) -> bool:
            if evicted is None:
                return False
            self.evictions += evicted
            self._report_healthy()
            return True

        return stored.addCallback(done)

    def _commit_blob(self, cache: diskcache.Cache, digest: Digest, path: str, size: int) -> int:
        with open(path, "rb") as f:
            # The entry must not point at data still only in the page cache.
            os.fsync(f.fileno())
        # diskcache's tag column holds the verified size, which lets a hit
        # be checked against its file without reading it.
        cache.set(_blob_key(digest), _VerifiedFile(path, size), tag=size)
        return _evict_to_limit(cache)

    # Manifests.

    def get_manifest(self, digest: Digest) -> Deferred[CachedManifest | None]:
        return self._read(self._get_manifest, digest)

    def _get_manifest(self, cache: diskcache.Cache, digest: Digest) -> CachedManifest | None:
        key = _manifest_key(digest)
        try:
            value = cache.get(key)
            if value is None:
                return None
            media_type, body = value
            return CachedManifest(media_type, body)
        except (ValueError, TypeError, EOFError, OSError, pickle.UnpicklingError):
            # A corrupt entry is a miss, and is removed.
            cache.delete(key)
            return None

    def put_manifest(self, digest: Digest, manifest: CachedManifest) -> Deferred[int | None]:
        return self._count_evictions(
            self._write(
                self._put_value, _manifest_key(digest), (manifest.media_type, manifest.body)
            )
        )

    # Tags.

    def get_tag(self, key: str) -> Deferred[TagEntry | None]:
        return self._read(self._get_tag, key)

    def _get_tag(self, cache: diskcache.Cache, key: str) -> TagEntry | None:
        try:
            value = cache.get("tag/" + key)
            return None if value is None else TagEntry(*value)
        except (ValueError, TypeError, EOFError, OSError):
            cache.delete("tag/" + key)
            return None

    def put_tag(self, key: str, entry: TagEntry) -> Deferred[int | None]:
        value = (entry.digest, entry.media_type, entry.size, entry.checked_at)
        return self._count_evictions(self._write(self._put_value, "tag/" + key, value))

    def _put_value(self, cache: diskcache.Cache, key: str, value: Any) -> int:
        cache.set(key, value)
        return _evict_to_limit(cache)

    def _count_evictions(self, stored: Deferred[int | None]) -> Deferred[int | None]:
        def count(evicted: int | None) -> int | None:
            self.evictions += evicted or 0
            return evicted

        return stored.addCallback(count)

    # Upkeep.

    def repair(self) -> Deferred[int | None]:
        """
        After a crash: remove files that no entry names (a crash between a
        blob being moved into the store and its entry being written) and
        entries whose file is gone.  Entries are only ever written after
        their file is complete, so nothing else can be half-done.
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
        self.log.info(
            "checked the cache after an unclean stop: {count} problems fixed", count=len(fixed)
        )
        return len(fixed)

    def update_figures(self) -> Deferred[None]:
        """Refresh L{last_volume} and L{last_entries}, off the reactor thread."""

        def figures(cache: diskcache.Cache) -> tuple[int, int]:
            return int(cache.volume()), len(cache)

        def keep(result: tuple[int, int] | None) -> None:
            if result is not None:
                self.last_volume, self.last_entries = result

        return self._read(figures).addCallback(keep)

    def volume(self) -> Deferred[int | None]:
        """The bytes the cache holds on disk, index included."""
        return self._read(lambda cache: int(cache.volume()))

    def entries(self) -> Deferred[int | None]:
        return self._read(lambda cache: len(cache))

    # For the command line ("txregistry cache ..."), which runs them directly.

    def stats(self) -> dict[str, Any]:
        """Size, entries by kind, and hits and misses since the cache was created."""
        cache = self._open_cache()
        kinds: dict[str, int] = {"blob": 0, "manifest": 0, "tag": 0}
        for key in cache.iterkeys():
            kind = str(key).split("/", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        hits, misses = cache.stats()
        return {
            "directory": str(self.directory),
            "size": int(cache.volume()),
            "size_limit": self.size_limit,
            "entries": len(cache),
            "by_kind": kinds,
            "hits": hits,
            "misses": misses,
        }

    def verify(self) -> tuple[int, list[str]]:
        """
        Re-hash every blob and manifest; remove those that do not match
        their digest.  Returns how many were checked, and the removed keys.
        """
        cache = self._open_cache()
        checked, removed = 0, []
        for key in list(cache.iterkeys()):
            kind, _, digest_text = str(key).partition("/")
            if kind not in ("blob", "manifest"):
                continue
            digest = Digest.parse(digest_text)
            checked += 1
            if not self._matches(cache, kind, key, digest):
                cache.delete(key)
                removed.append(str(key))
        return checked, removed

    def _matches(self, cache: diskcache.Cache, kind: str, key: str, digest: Digest) -> bool:
        hasher = digest.hasher()
        try:
            if kind == "manifest":
                _, body = cache.get(key)
                hasher.update(body)
            else:
                file = cache.get(key, read=True)
                if file is None:
                    return True  # evicted meanwhile
                with file:
                    for chunk in iter(lambda: file.read(1 << 20), b""):
                        hasher.update(chunk)
        except Exception:
            return False
        return hasher.hexdigest() == digest.hex

    def gc(self) -> int:
        """Apply the size limit now; return how many entries were evicted."""
        return _evict_to_limit(self._open_cache())

    def _open_cache(self) -> diskcache.Cache:
        if self._cache is None:
            raise OSError(self.problem or "the cache is not open")
        return self._cache

    # Running diskcache calls.

    def _read(self, f: Callable[..., T], *args: Any) -> Deferred[T | None]:
        """Run a lookup off the reactor thread; a failed lookup is a miss."""
        return self._call(f, args, write=False)

    def _write(self, f: Callable[..., T], *args: Any) -> Deferred[T | None]:
        """Run a store off the reactor thread; a failed store is skipped."""
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
