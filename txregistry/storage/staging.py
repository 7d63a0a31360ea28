"""
Staging a blob: writing it to a file and hashing it, in order, as it
arrives, until it is committed or aborted.

L{StagedFile} is the disk's L{IStagedBlob}: a temporary file, a spool that
writes and hashes into it, and reads of what is already written, for the
clients that follow a download.

Hashing (SHA-256 runs at about 2 GB/s on one core) and copying into the
page cache are most of what a cold miss costs.  Both release the GIL, so
L{ThreadSpool} does them on a thread of its own, a batch of chunks at a
time: the reactor thread goes on receiving from the upstream and sending
to clients while the hash and the disk write run beside it
(bench/RESULTS.md has the figures).
L{InlineSpool} does the same work on the caller's thread, at once, for
in-memory tests that drive the reactor by hand.

A spool owns a duplicate of the file descriptor it writes, and closes it
when it is done, so that the file can be closed by its readers at any time.
A write that fails (the disk is full) stops the writing, not the hashing:
L{Spool.failure} says why, and L{Spool.written} how much made it to disk.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure
from zope.interface import implementer

from txregistry.oci.reference import Digest
from txregistry.storage.interface import IStagedBlob
from txregistry.storage.runner import BlockingRunner, run_inline


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class Spool(Protocol):
    @property
    def written(self) -> int:
        """
        How many bytes, from the start, are in the file and hashed: the
        fill need not keep them in memory any more.
        """

    @property
    def failure(self) -> OSError | None:
        """Why writing stopped, if it did."""

    def append(self, data: bytes, on_disk: bool = False) -> None:
        """
        Write and hash C{data} after everything appended before it; only
        hash it if it is C{on_disk} already (a segment wrote it ahead).
        """

    def wake_on_progress(self, seen: int, callback: Callable[[], None]) -> None:
        """
        Call C{callback}, once, in the reactor thread, as soon as
        L{written} is past C{seen} or writing has failed.
        """

    def close(self) -> Deferred[str]:
        """Finish: fires with the hex digest of everything appended."""

    def abandon(self) -> None:
        """Stop as soon as possible; nothing more will be asked."""


SpoolFactory = Callable[[int, Hasher], Spool]


def _write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write C{data}; return how much was written, and why not all."""
    view = memoryview(data)
    total = 0
    while total < len(data):
        try:
            total += os.write(fd, view[total:])
        except OSError as e:
            return total, e
    return total, None


class InlineSpool:
    """Writes and hashes in L{append} itself."""

    def __init__(self, fd: int, hasher: Hasher) -> None:
        self._fd: int | None = os.dup(fd)
        self._hasher = hasher
        self.written = 0
        self.failure: OSError | None = None

    def append(self, data: bytes, on_disk: bool = False) -> None:
        if self._fd is not None and self.failure is None:
            if on_disk:
                os.lseek(self._fd, len(data), os.SEEK_CUR)
                self.written += len(data)
            else:
                written, self.failure = _write_all(self._fd, data)
                self.written += written
        self._hasher.update(data)

    def wake_on_progress(self, seen: int, callback: Callable[[], None]) -> None:
        # Every append is written before it returns: there is nothing to
        # wait for, and a fill never asks.
        callback()

    def close(self) -> Deferred[str]:
        self._close_file()
        return succeed(self._hasher.hexdigest())

    def abandon(self) -> None:
        self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_CLOSE = object()


@dataclass(frozen=True)
class _OnDisk:
    """Bytes a segment already wrote in place: the writer only moves past them."""

    size: int
    data: bytes = b""


class ThreadSpool:
    """
    Writes and hashes on one thread of its own, living as long as the
    download, in batches: the reactor hands it the chunks it receives a
    batch at a time (L{BATCH} bytes, or fewer when someone waits for
    progress), and the thread writes each chunk and hashes it while it is
    still in the CPU's cache, then reports progress once for the batch.
    One thread and one hand-off a batch cost less CPU than a thread each
    for the hash and the write with a hand-off a chunk (bench/RESULTS.md).
    C{call_in_reactor} is the reactor's C{callFromThread}.

    L{written} counts the bytes that are both in the file and hashed: the
    fill keeps every other byte in memory, which bounds what the queue and
    the batch being filled can hold.
    """

    BATCH = 1 << 20

    def __init__(
        self, fd: int, hasher: Hasher, call_in_reactor: Callable[..., None], name: str = ""
    ) -> None:
        self._fd = os.dup(fd)
        self._hasher = hasher
        self._call_in_reactor = call_in_reactor
        self._queue: SimpleQueue[Any] = SimpleQueue()
        # The batch being filled, in the reactor thread.
        self._batch: list[bytes | _OnDisk] = []
        self._batch_size = 0
        self._lock = threading.Lock()
        # Changed by the spool thread, under the lock; read by the reactor.
        self.written = 0
        self.failure: OSError | None = None
        self._waiting: Callable[[], None] | None = None
        self._abandoned = False
        self._broken: Failure | None = None
        self._closed: Deferred[str] = Deferred()
        label = f"txregistry spool {name}".strip()
        self._threads = [threading.Thread(target=self._spool_queued, name=label, daemon=True)]
        self._threads[0].start()

    def append(self, data: bytes, on_disk: bool = False) -> None:
        self._batch.append(_OnDisk(len(data), data) if on_disk else data)
        self._batch_size += len(data)
        if self._batch_size >= self.BATCH or self._waiting is not None:
            self._hand_over()

    def wake_on_progress(self, seen: int, callback: Callable[[], None]) -> None:
        self._hand_over()
        with self._lock:
            if self.written == seen and self.failure is None:
                self._waiting = callback
                return
        callback()

    def close(self) -> Deferred[str]:
        self._hand_over()
        self._queue.put(_CLOSE)
        return self._closed

    def abandon(self) -> None:
        self._abandoned = True
        self._batch = []
        self.close()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (for tests)."""
        for thread in self._threads:
            thread.join(timeout)

    def _hand_over(self) -> None:
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_size = [], 0

    # The spool thread.

    def _spool_queued(self) -> None:
        digest: str | None = None
        while True:
            batch = self._queue.get()
            if self._abandoned:
                break
            if batch is _CLOSE:
                if self._broken is None:
                    try:
                        digest = self._hasher.hexdigest()
                    except BaseException as e:
                        self._break(e)
                break
            if self._broken is None:
                try:
                    self._spool(batch)
                except BaseException as e:
                    self._break(e)
        os.close(self._fd)
        if self._abandoned:
            return
        if self._broken is not None:
            self._call_in_reactor(self._closed.errback, self._broken)
        else:
            self._call_in_reactor(self._closed.callback, digest)

    def _spool(self, batch: list[bytes | _OnDisk]) -> None:
        """Write and hash each chunk of C{batch}, in order; report progress once."""
        on_disk = 0
        failure = self.failure
        for item in batch:
            if isinstance(item, _OnDisk):
                data = item.data
                if failure is None:
                    os.lseek(self._fd, item.size, os.SEEK_CUR)
                    on_disk += item.size
            else:
                data = item
                if failure is None:
                    written, failure = _write_all(self._fd, data)
                    on_disk += written
            self._hasher.update(data)
        self._progress(on_disk, failure)

    def _break(self, error: BaseException) -> None:
        """
        A bug, not a full disk: stop writing, so that the fill relays rather
        than waits, and fail it at the end.  Called in an C{except} block.
        """
        broken = Failure()
        with self._lock:
            self._broken = self._broken or broken
        self._progress(0, OSError(errno.EIO, f"cannot spool the download: {error}"))

    def _progress(self, on_disk: int, failure: OSError | None) -> None:
        with self._lock:
            # Once writing has failed, bytes are hashed but no longer written.
            self.written += on_disk
            self.failure = self.failure or failure
            if not on_disk and failure is None:
                return
            waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._call_in_reactor(waiting)


def threaded_spools(reactor: IReactorThreads) -> SpoolFactory:
    """A factory of L{ThreadSpool}s that report to C{reactor}'s thread."""

    def spool(fd: int, hasher: Hasher) -> Spool:
        return ThreadSpool(fd, hasher, reactor.callFromThread)

    return spool


class AheadFile:
    """
    Writes and reads at any offset of a staged file, through the storage
    runner: the bytes of a segmented download that arrive ahead of the
    in-order front (L{txregistry.repository.segments}).  They go where
    they belong in the file, and are read back when the front reaches them,
    to be appended C{on_disk}: hashed in order, and not written again.  It
    owns a duplicate of the file descriptor, closed once it is closed and
    nothing it started is still running.
    """

    def __init__(self, fd: int, run_blocking: BlockingRunner) -> None:
        self._fd = os.dup(fd)
        self._run = run_blocking
        self._running = 0
        self._closing = False

    def write_at(self, offset: int, chunks: list[bytes]) -> Deferred[None]:
        """Write C{chunks}, one after the other, from C{offset}: one C{pwritev} when it can."""
        return self._call(_pwrite_all, self._fd, chunks, offset)

    def read_at(self, offset: int, length: int) -> Deferred[bytes]:
        return self._call(os.pread, self._fd, length, offset)

    def close(self) -> None:
        self._closing = True
        self._close_if_idle()

    def _call(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        assert not self._closing, "a closed AheadFile was used"
        self._running += 1

        def done(result: object) -> object:
            self._running -= 1
            self._close_if_idle()
            return result

        return self._run(f, *args).addBoth(done)

    def _close_if_idle(self) -> None:
        if self._closing and not self._running and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwrite_all(fd: int, chunks: list[bytes], offset: int) -> None:
    """Write all of C{chunks} from C{offset}, in as few system calls as the kernel allows."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        written = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


_IOV_MAX = 1024


@implementer(IStagedBlob)
class StagedFile:
    """
    A blob staged in a temporary file of the disk backend.

    C{commit} is the backend's: it moves the sealed file into the store.
    The file descriptor stays open for reading back until L{close}, even
    once the file has been moved or removed.
    """

    def __init__(
        self,
        fd: int,
        path: str,
        hasher: Hasher,
        spools: SpoolFactory,
        commit: Callable[[StagedFile, Digest, int, bool], Deferred[bool]],
        run_blocking: BlockingRunner = run_inline,
    ) -> None:
        self.path = path
        self._run = run_blocking
        self._fd: int | None = fd
        self._spool = spools(fd, hasher)
        self._commit = commit
        self._sealed: str | None = None

    @property
    def written(self) -> int:
        return self._spool.written

    @property
    def failure(self) -> OSError | None:
        return self._spool.failure

    def append(self, data: bytes, on_disk: bool = False) -> None:
        if on_disk:
            self._spool.append(data, on_disk=True)
        else:
            self._spool.append(data)

    def wake_on_progress(self, seen: int, callback: Callable[[], None]) -> None:
        self._spool.wake_on_progress(seen, callback)

    def read(self, offset: int, length: int) -> bytes:
        assert self._fd is not None, "a staged file was read after it was closed"
        return os.pread(self._fd, min(length, self.written - offset), offset)

    def duplicate_fd(self) -> int:
        """
        A file descriptor of the staged file's own, for a reader that outlives
        L{close} (the S3 tier uploads from it after the fill is done); its
        caller closes it.
        """
        assert self._fd is not None, "a staged file was duplicated after it was closed"
        return os.dup(self._fd)

    def ahead(self) -> AheadFile:
        assert self._fd is not None, "a staged file was written after it was closed"
        return AheadFile(self._fd, self._run)

    def seal(self) -> Deferred[str]:
        def sealed(hex_digest: str) -> str:
            self._sealed = hex_digest
            return hex_digest

        return self._spool.close().addCallback(sealed)

    def commit(self, digest: Digest, size: int, pinned: bool = False) -> Deferred[bool]:
        # The owner checked the digest; this makes sure it checked this one.
        assert self._sealed == digest.hex, "a staged blob was committed under another digest"
        return self._commit(self, digest, size, pinned)

    def abort(self) -> None:
        self._spool.abandon()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
