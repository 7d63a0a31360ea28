"""
Downloads are written and hashed off the reactor thread, and clients at
the front of a download are sent its bytes from memory without waiting for
the disk; the download waits for a disk that falls a window behind.
"""

import functools
import hashlib
import os
import queue
from pathlib import Path

import pytest
from harness.memory import MemoryRegistry
from twisted.internet.defer import Deferred, succeed

from txregistry.repository import fill as fill_module
from txregistry.repository import fills as fills_module
from txregistry.storage.staging import InlineSpool, ThreadSpool

# Guards against a hung thread, never a measurement.
HANG_GUARD = 60.0

BLOB = os.urandom(300_000)


class SlowDiskSpool:
    """A spool whose disk takes what it is given only when the test says so."""

    def __init__(self, fd: int, hasher) -> None:
        self._fd = os.dup(fd)
        self._hasher = hasher
        self._pending: list[bytes] = []
        self.written = 0
        self.failure = None
        self._waiting = None
        self._closed: Deferred[str] | None = None

    def append(self, data: bytes) -> None:
        self._pending.append(data)
        self._hasher.update(data)

    def flush(self) -> None:
        for data in self._pending:
            os.write(self._fd, data)
            self.written += len(data)
        self._pending = []
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting()
        if self._closed is not None:
            self._closed.callback(self._hasher.hexdigest())

    def wake_on_progress(self, seen: int, callback) -> None:
        if self.written != seen:
            callback()
        else:
            self._waiting = callback

    def close(self) -> Deferred[str]:
        if self._pending:
            self._closed = Deferred()
            return self._closed
        return succeed(self._hasher.hexdigest())

    def abandon(self) -> None:
        pass


@pytest.fixture
def slow_disk(monkeypatch):
    """A registry whose downloads' spools are kept in a list, with a 64 KiB window."""
    monkeypatch.setattr(
        fills_module, "FillPolicy", functools.partial(fill_module.FillPolicy, relay_window=65_536)
    )
    holds: list[bool] = []
    hold = fill_module.FillFromResponse.hold
    monkeypatch.setattr(
        fill_module.FillFromResponse,
        "hold",
        lambda self, held: holds.append(held) or hold(self, held),
    )
    spools: list[SlowDiskSpool] = []

    def spool(fd: int, hasher) -> SlowDiskSpool:
        spools.append(SlowDiskSpool(fd, hasher))
        return spools[-1]

    return spools, holds, spool


def test_front_client_is_served_from_memory_and_the_download_waits_for_the_disk(
    tmp_path: Path, slow_disk
) -> None:
    spools, holds, spool = slow_disk
    registry = MemoryRegistry(tmp_path, spool=spool)
    digest, held, client = registry.pull_held(BLOB)

    held[0].write(BLOB[:50_000])
    registry.pump()
    assert spools[0].written == 0, "nothing is on disk yet"
    assert client.transport.value().endswith(BLOB[:49_999]), "all but the held-back last byte"
    assert holds == []

    held[0].write(BLOB[50_000:150_000])
    registry.pump()
    assert holds[-1] is True, "150 KB wait for the disk: more than the window"

    spools[0].flush()
    assert holds[-1] is False, "the disk caught up"
    held[0].write(BLOB[150_000:])
    held[0].finish()
    registry.pump()
    assert not client.response().complete, "not verified until the disk has it all"

    spools[0].flush()
    registry.pump()
    response = client.response()
    assert (response.body, response.complete) == (BLOB, True)
    assert registry.get(f"/v2/alpine/blobs/{digest}").headers["x-cache"] == "HIT"


def test_a_client_behind_the_disk_reads_the_file(tmp_path: Path, slow_disk) -> None:
    spools, _, spool = slow_disk
    registry = MemoryRegistry(tmp_path, spool=spool)
    digest, held, first = registry.pull_held(BLOB)
    held[0].write(BLOB[:60_000])
    registry.pump()
    spools[0].flush()  # on disk, and out of memory
    held[0].write(BLOB[60_000:100_000])
    registry.pump()

    late = registry.client()
    late.send("GET", f"/v2/alpine/blobs/{digest}")
    assert late.transport.value().endswith(BLOB[:99_999]), "from the file, then from memory"
    held[0].write(BLOB[100_000:])
    held[0].finish()
    registry.pump()
    spools[0].flush()
    registry.pump()
    assert late.response().body == first.response().body == BLOB


# The thread spool itself, with a real thread.


class ReactorThread:
    """Stands in for callFromThread: the test runs what the spool thread sends."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def __call__(self, f, *args) -> None:
        self.calls.put((f, args))

    def run_next(self) -> None:
        f, args = self.calls.get(timeout=HANG_GUARD)
        f(*args)


def open_file(tmp_path: Path) -> tuple[int, Path]:
    path = tmp_path / "download"
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600), path


def digest_of(spool_close: Deferred[str], reactor: ReactorThread) -> str:
    results: list[str] = []
    spool_close.addCallback(results.append)
    while not results:
        reactor.run_next()
    return results[0]


def test_thread_spool_writes_and_hashes_in_order(tmp_path: Path) -> None:
    fd, path = open_file(tmp_path)
    reactor = ReactorThread()
    spool = ThreadSpool(fd, hashlib.sha256(), reactor)
    pieces = [BLOB[i : i + 7_000] for i in range(0, len(BLOB), 7_000)]
    for piece in pieces:
        spool.append(piece)
    assert digest_of(spool.close(), reactor) == hashlib.sha256(BLOB).hexdigest()
    assert (spool.written, spool.failure) == (len(BLOB), None)
    assert path.read_bytes() == BLOB
    spool.join(HANG_GUARD)
    os.fstat(fd)  # the spool closed its own descriptor, not this one
    os.close(fd)


def test_thread_spool_wakes_the_reactor_on_progress(tmp_path: Path) -> None:
    fd, _ = open_file(tmp_path)
    reactor = ReactorThread()
    spool = ThreadSpool(fd, hashlib.sha256(), reactor)
    woken: list[int] = []
    spool.wake_on_progress(0, lambda: woken.append(spool.written))
    spool.append(b"x" * 1000)
    reactor.run_next()
    assert woken == [1000]
    # Asking about progress already made answers at once.
    spool.wake_on_progress(0, lambda: woken.append(-1))
    assert woken == [1000, -1]
    digest_of(spool.close(), reactor)
    os.close(fd)


def test_thread_spool_keeps_hashing_when_the_disk_is_full(tmp_path: Path, monkeypatch) -> None:
    from txregistry.storage import staging as spool_module

    real_write = os.write

    class FullDisk:
        def __getattr__(self, name):
            return full if name == "write" else getattr(os, name)

    def full(fd: int, data) -> int:
        if os.fstat(fd).st_size >= 10_000:
            raise OSError(28, "No space left on device")
        return real_write(fd, bytes(data[:4_000]))

    monkeypatch.setattr(spool_module, "os", FullDisk())
    fd, path = open_file(tmp_path)
    reactor = ReactorThread()
    spool = ThreadSpool(fd, hashlib.sha256(), reactor)
    spool.append(BLOB[:50_000])
    spool.append(BLOB[50_000:])
    assert digest_of(spool.close(), reactor) == hashlib.sha256(BLOB).hexdigest()
    assert spool.failure is not None and spool.failure.errno == 28
    assert spool.written == 12_000 == path.stat().st_size
    os.close(fd)


def test_an_abandoned_thread_spool_stops_without_a_word(tmp_path: Path) -> None:
    fd, _ = open_file(tmp_path)
    reactor = ReactorThread()
    spool = ThreadSpool(fd, hashlib.sha256(), reactor)
    spool.append(b"x" * 1000)
    spool.abandon()
    spool.join(HANG_GUARD)
    assert not any(thread.is_alive() for thread in spool._threads)
    while not reactor.calls.empty():
        f, args = reactor.calls.get_nowait()
        assert f not in (spool._closed.callback, spool._closed.errback), "nothing is reported"
        f(*args)
    assert not spool._closed.called
    os.close(fd)


def test_a_thread_spool_that_breaks_says_so(tmp_path: Path) -> None:
    class BrokenHasher:
        def update(self, data: bytes) -> None:
            raise ValueError("hasher broke")

        def hexdigest(self) -> str:
            return "never asked"

    fd, _ = open_file(tmp_path)
    reactor = ReactorThread()
    spool = ThreadSpool(fd, BrokenHasher(), reactor)
    spool.append(b"data")
    spool.append(b"more")
    failures: list = []
    spool.close().addErrback(failures.append)
    while not failures:
        reactor.run_next()
    assert failures[0].check(ValueError)
    # Writing stops with it, so that a fill relays rather than waits.
    assert "cannot spool the download: hasher broke" in str(spool.failure)
    assert spool.written == 0, "nothing counts as spooled that was not hashed"
    os.close(fd)


def test_inline_spool_writes_at_once(tmp_path: Path) -> None:
    fd, path = open_file(tmp_path)
    spool = InlineSpool(fd, hashlib.sha256())
    spool.append(BLOB[:1000])
    assert (spool.written, path.read_bytes()) == (1000, BLOB[:1000])
    assert spool.close().result == hashlib.sha256(BLOB[:1000]).hexdigest()
    os.close(fd)


@pytest.mark.parametrize("threaded", [False, True])
def test_bytes_already_on_disk_are_hashed_and_not_written_again(
    tmp_path: Path, threaded: bool
) -> None:
    fd, path = open_file(tmp_path)
    # A segment wrote the middle ahead, in place; the marker shows whether
    # the spool wrote over it.
    middle = b"\0" * 10_000
    os.pwrite(fd, middle, 10_000)
    reactor = ReactorThread()
    spool = (
        ThreadSpool(fd, hashlib.sha256(), reactor)
        if threaded
        else InlineSpool(fd, hashlib.sha256())
    )
    spool.append(BLOB[:10_000])
    spool.append(BLOB[10_000:20_000], on_disk=True)
    spool.append(BLOB[20_000:30_000])
    closed = spool.close()
    digest = digest_of(closed, reactor) if threaded else closed.result
    assert digest == hashlib.sha256(BLOB[:30_000]).hexdigest()
    assert spool.written == 30_000
    assert path.read_bytes() == BLOB[:10_000] + middle + BLOB[20_000:30_000]
    os.close(fd)
