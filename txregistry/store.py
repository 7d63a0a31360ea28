"""
The disk cache: blobs, manifests and tag answers, kept in diskcache.

Layout of the cache directory::

    tmp/     downloads in progress; emptied at startup
    store/   the diskcache database and the blob files it owns

A blob is downloaded into C{tmp/}, hashed as it arrives, and only once its
size and digest have been checked is its file I{moved} (not copied) into
diskcache's tree by L{_MovingDisk}.  diskcache then owns it: it counts its
size against the limit and deletes it when it evicts it, least recently used
first.  Every diskcache call blocks, so all of them go through the
C{run_blocking} callable, which in the service runs them in a thread pool of
their own.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import diskcache
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from txregistry.reference import Digest

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


def _blob_key(digest: Digest) -> str:
    return f"blob/{digest}"


def _manifest_key(digest: Digest) -> str:
    return f"manifest/{digest}"


class CacheStore:
    """
    Cached content by digest, and tag answers, on disk.

    Until L{open} succeeds the store is unavailable: every lookup misses and
    nothing is stored, so requests are still served, straight from upstream.
    """

    log = Logger()

    def __init__(self, directory: Path, size_limit: int, run_blocking: BlockingRunner) -> None:
        self.directory = directory
        self.size_limit = size_limit
        self._run = run_blocking
        self._cache: diskcache.Cache | None = None
        self.problem: str | None = "not opened yet"

    @property
    def available(self) -> bool:
        return self._cache is not None

    @property
    def tmp_directory(self) -> Path:
        return self.directory / "tmp"

    def open(self) -> None:
        """
        Create the directories, remove downloads left by a previous run, and
        open diskcache.  Called once at startup, before the reactor runs.
        """
        try:
            self.tmp_directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.tmp_directory.iterdir():
                leftover.unlink()
            self._cache = diskcache.Cache(
                str(self.directory / "store"),
                disk=_MovingDisk,
                size_limit=self.size_limit,
                eviction_policy="least-recently-used",
            )
        except (OSError, diskcache.Timeout) as e:
            self.problem = f"cannot open cache in {self.directory}: {e}"
            self.log.error("{problem}; serving without a cache", problem=self.problem)
            return
        self.problem = None

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    # Blobs.

    def new_temp_file(self, digest: Digest) -> tuple[int, str]:
        """
        Create a file for a download in progress: an open file descriptor
        (for reading and writing) and its path.
        """
        fd, path = tempfile.mkstemp(
            prefix=f"{digest.algorithm}-{digest.hex[:16]}.",
            suffix=".partial",
            dir=self.tmp_directory,
        )
        return fd, path

    def open_blob(self, digest: Digest) -> Deferred[CachedBlob | None]:
        return self._call(self._open_blob, digest)

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

    def commit_blob(self, digest: Digest, path: str, size: int) -> Deferred[None]:
        """Move a verified download into the cache."""
        return self._call(self._commit_blob, digest, path, size)

    def _commit_blob(self, cache: diskcache.Cache, digest: Digest, path: str, size: int) -> None:
        with open(path, "rb") as f:
            # The entry must not point at data still only in the page cache.
            os.fsync(f.fileno())
        # diskcache's tag column holds the verified size, which lets a hit
        # be checked against its file without reading it.
        cache.set(_blob_key(digest), _VerifiedFile(path, size), tag=size)
        cache.cull()

    # Manifests.

    def get_manifest(self, digest: Digest) -> Deferred[CachedManifest | None]:
        return self._call(self._get_manifest, digest)

    def _get_manifest(self, cache: diskcache.Cache, digest: Digest) -> CachedManifest | None:
        key = _manifest_key(digest)
        try:
            value = cache.get(key)
            if value is None:
                return None
            media_type, body = value
            return CachedManifest(media_type, body)
        except Exception:
            # A corrupt entry is a miss, and is removed.
            cache.delete(key)
            return None

    def put_manifest(self, digest: Digest, manifest: CachedManifest) -> Deferred[None]:
        return self._call(self._put_manifest, digest, manifest)

    def _put_manifest(
        self, cache: diskcache.Cache, digest: Digest, manifest: CachedManifest
    ) -> None:
        cache.set(_manifest_key(digest), (manifest.media_type, manifest.body))

    # Tags.

    def get_tag(self, key: str) -> Deferred[TagEntry | None]:
        return self._call(self._get_tag, key)

    def _get_tag(self, cache: diskcache.Cache, key: str) -> TagEntry | None:
        try:
            value = cache.get("tag/" + key)
            return None if value is None else TagEntry(*value)
        except Exception:
            cache.delete("tag/" + key)
            return None

    def put_tag(self, key: str, entry: TagEntry) -> Deferred[None]:
        return self._call(self._put_tag, key, entry)

    def _put_tag(self, cache: diskcache.Cache, key: str, entry: TagEntry) -> None:
        cache.set("tag/" + key, (entry.digest, entry.media_type, entry.size, entry.checked_at))

    def _call(self, f: Callable[..., T], *args: Any) -> Deferred[T | None]:
        """
        Run a diskcache operation off the reactor thread.  Without a cache,
        lookups miss and stores do nothing.
        """
        cache = self._cache
        if cache is None:
            return succeed(None)
        return self._run(f, cache, *args)
