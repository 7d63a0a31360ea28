"""
Writing a download to its file and hashing it, in order, as it arrives.

Hashing (SHA-256 runs at about 2 GB/s on one core) and copying into the
page cache are most of what a cold miss costs.  Both release the GIL, so
L{ThreadSpool} does them on a thread of its own: the reactor thread goes on
receiving from the upstream and sending to clients while the other core
hashes and writes (bench/RESULTS.md has the figures).  L{InlineSpool} does
the same work on the caller's thread, at once, for in-memory tests that
drive the reactor by hand.

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
from queue import SimpleQueue
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class Spool(Protocol):
    @property
    def written(self) -> int:
        """How many bytes, from the start, are in the file."""

    @property
    def failure(self) -> OSError | None:
        """Why writing stopped, if it did."""

    def append(self, data: bytes) -> None:
        """Write and hash C{data} after everything appended before it."""

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

    def append(self, data: bytes) -> None:
        if self._fd is not None and self.failure is None:
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


class ThreadSpool:
    """
    Writes and hashes on a thread of its own, which lives as long as the
    download.  C{call_in_reactor} is the reactor's C{callFromThread}.
    """

    def __init__(
        self, fd: int, hasher: Hasher, call_in_reactor: Callable[..., None], name: str = ""
    ) -> None:
        self._fd = os.dup(fd)
        self._hasher = hasher
        self._call_in_reactor = call_in_reactor
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._lock = threading.Lock()
        # Written by the spool thread, under the lock; read by the reactor.
        self.written = 0
        self.failure: OSError | None = None
        self._waiting: Callable[[], None] | None = None
        self._abandoned = False
        self._closed: Deferred[str] = Deferred()
        self._thread = threading.Thread(
            target=self._run, name=f"txregistry spool {name}".strip(), daemon=True
        )
        self._thread.start()

    def append(self, data: bytes) -> None:
        self._queue.put(data)

    def wake_on_progress(self, seen: int, callback: Callable[[], None]) -> None:
        with self._lock:
            if self.written == seen and self.failure is None:
                self._waiting = callback
                return
        callback()

    def close(self) -> Deferred[str]:
        self._queue.put(_CLOSE)
        return self._closed

    def abandon(self) -> None:
        self._abandoned = True
        self._queue.put(_CLOSE)

    # The spool thread.

    def _run(self) -> None:
        report: Callable[[], None] | None = None
        broken: Failure | None = None
        while True:
            item = self._queue.get()
            if self._abandoned:
                break
            if item is _CLOSE:
                report = self._report(broken)
                break
            if broken is None:
                try:
                    self._write_and_hash(item)
                except BaseException as e:
                    # A bug, not a full disk: stop writing, so that the fill
                    # relays rather than waits, and fail it at the end.
                    broken = Failure()
                    self._progress(0, OSError(errno.EIO, f"cannot spool the download: {e}"))
        os.close(self._fd)
        if report is not None:
            self._call_in_reactor(report)

    def _write_and_hash(self, data: bytes) -> None:
        if self.failure is None:
            self._progress(*_write_all(self._fd, data))
        self._hasher.update(data)

    def _progress(self, written: int, failure: OSError | None) -> None:
        with self._lock:
            self.written += written
            self.failure = self.failure or failure
            waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._call_in_reactor(waiting)

    def _report(self, broken: Failure | None) -> Callable[[], None]:
        if broken is None:
            try:
                digest = self._hasher.hexdigest()
            except BaseException:
                broken = Failure()
            else:
                return lambda: self._closed.callback(digest)
        failure = broken
        return lambda: self._closed.errback(failure)


def threaded_spools(reactor: IReactorThreads) -> SpoolFactory:
    """A factory of L{ThreadSpool}s that report to C{reactor}'s thread."""

    def spool(fd: int, hasher: Hasher) -> Spool:
        return ThreadSpool(fd, hasher, reactor.callFromThread)

    return spool
