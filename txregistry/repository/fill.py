"""
Downloading a blob from upstream while clients read it.

A L{BlobFill} hands the upstream's bytes to a spool (L{txregistry.storage.staging}),
which writes them to a temporary file and hashes them, and keeps them in
memory until they are on disk.  Any number of L{FileSender}s follow the
download, each at its own pace: a client at the front is sent the bytes
just received, from memory, and one behind reads them back from the file.
A slow client therefore costs a file offset, not memory, and slows neither
the download nor the other clients.  None of them is given the last byte
until the size and digest have been checked: a client can never take a
corrupt or truncated blob for a complete one.  When the disk is slower than
the upstream, the download waits for it once C{relay_window} bytes are
waiting in memory.

When the upstream connection is cut, or sends nothing for C{body_timeout},
the download resumes with a C{Range} request from the byte already
received, first from the same mirror, then from the next; the hash carries
on, and the clients see one uninterrupted stream.  Only when that fails
too are their connections aborted.  Nothing partial or unverified is ever
cached.

If the file cannot be written (the disk is full), the fill I{relays}: what
is on disk stays readable, new bytes stay in memory until every client has
sent them, and the download waits for the slowest client when
C{relay_window} bytes are waiting.  The clients still get the whole,
verified blob; it is not cached.

L{StreamThrough} pipes an upstream response straight to one client when a
blob is not to be cached at all (it is larger than the cache, say).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from txregistry.oci.reference import Digest
from txregistry.oci.verify import BlobCheckFailed, check_blob
from txregistry.repository.segments import (
    SEGMENT_AFTER,
    FetchRange,
    Segments,
    plan,
    worth_segmenting,
)
from txregistry.storage.interface import IStagedBlob, Reader
from txregistry.upstream.bodies import describe_failure
from txregistry.upstream.client import UpstreamResponse

_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FillAbandoned(Exception):
    """The download was stopped because nobody wants it any more."""


class Resumer(TypingProtocol):
    """Asks the upstream again for a blob, from byte C{offset} on."""

    def __call__(self, offset: int, last_mirror: str) -> Awaitable[UpstreamResponse]: ...


@dataclass(frozen=True)
class FillPolicy:
    """
    @ivar resume_attempts: how many times a cut download is resumed.
    @ivar body_timeout: how long a download may go without a byte before it
        counts as cut.
    @ivar fill_without_clients: whether a download goes on once every
        client that wanted it has gone, so that the next pull is a hit.
    @ivar relay_window: how many bytes a fill keeps in memory, not yet on
        disk or, when relaying, not yet sent to every client, before it
        pauses the download.  Larger than a sender's chunk.
    @ivar segments: how many concurrent C{Range} requests a blob larger
        than C{segments_above} bytes is fetched with
        (L{txregistry.repository.segments}).
    """

    resume_attempts: int = 3
    body_timeout: float = 30.0
    fill_without_clients: bool = True
    relay_window: int = 8 << 20
    segments: int = 1
    segments_above: int = 64 << 20


class _Tail:
    """
    The newest bytes of a download, kept in memory, as the chunks they
    arrived in: from C{start} to C{start + size}.
    """

    def __init__(self) -> None:
        self.start = 0
        self.size = 0
        self._chunks: deque[bytes] = deque()

    @property
    def end(self) -> int:
        return self.start + self.size

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)

    def read(self, offset: int, length: int) -> bytes:
        """Up to C{length} bytes from C{offset}, from one chunk; whole chunks are not copied."""
        position = self.start
        for chunk in self._chunks:
            if offset < position + len(chunk):
                skip = offset - position
                if skip == 0 and len(chunk) <= length:
                    return chunk
                return chunk[skip : skip + length]
            position += len(chunk)
        return b""

    def drop_before(self, offset: int) -> None:
        """Forget the bytes before C{offset}."""
        while self._chunks and self.start < offset:
            chunk = self._chunks.popleft()
            drop = min(len(chunk), offset - self.start)
            if drop < len(chunk):
                # Only when relaying, or the disk took part of a chunk: the
                # spool's writes are otherwise whole chunks.
                self._chunks.appendleft(chunk[drop:])
            self.start += drop
            self.size -= drop

    def clear(self) -> None:
        self.drop_before(self.end)


class BlobFill:
    """
    One upstream download of one blob into a temporary file.

    It is reference counted (see L{ByteSource}): the owner that creates it
    and hands it to clients holds the first reference, and takes another for
    each client it hands it to.

    @ivar verified: fires with the blob's size once all of it has arrived
        and matched its digest, or fails with the reason it never will.
    @ivar cacheable: false once the fill has had to relay, its file being
        incomplete.
    @ivar resumes: how many times the download was resumed.
    """

    log = Logger()

    def __init__(
        self,
        digest: Digest,
        expected_size: int | None,
        staged: IStagedBlob,
        source: str,
        clock: IReactorTime,
        policy: FillPolicy = FillPolicy(),
        resume: Resumer | None = None,
        on_relay: Callable[[BlobFill, str], None] | None = None,
        on_data: Callable[[int], None] | None = None,
        fetch_range: FetchRange | None = None,
        mirrors: Callable[[], list[str]] = list,
    ) -> None:
        self.digest = digest
        self.expected_size = expected_size
        self.source = source
        self.clock = clock
        self.policy = policy
        self.received = 0
        self.resumes = 0
        self.cacheable = True
        self.verified: Deferred[int] = Deferred()
        self._resume = resume
        self._on_relay = on_relay
        self._on_data = on_data
        # Fired by the owner once it hands the fill out no more.
        self.settled: Deferred[None] = Deferred()
        self._staged = staged
        self._closed = False
        self._complete = False
        self._download_ended = False
        self._failure: Failure | None = None
        self._senders: set[Reader] = set()
        self._references = 1
        # What feeds the front: a response, or a segment that took over.
        self._download: _Front | None = None
        # Bytes before _on_disk are in the file; bytes from _tail.start on
        # are in memory.  _tail.start <= _on_disk, except when relaying,
        # when bytes every client has sent may be gone from both.
        self._on_disk = 0
        self._tail = _Tail()
        self._relaying = False
        self._paused = False
        self._waiting_for_disk = False
        self._fetch_range = fetch_range
        self._mirrors = mirrors
        self._segments: Segments | None = None
        self._segment_timer: IDelayedCall | None = None

    def start(self, response: UpstreamResponse) -> None:
        """
        Download from C{response}'s body; if it is large, and still slow
        after L{SEGMENT_AFTER}, fetch the rest in segments too.
        """
        policy = self.policy
        spans = plan(self.expected_size, policy.segments, policy.segments_above)
        response.response.deliverBody(FillFromResponse(self))
        if len(spans) > 1 and response.code == 200 and self._fetch_range is not None:
            self._segment_timer = self.clock.callLater(SEGMENT_AFTER, self._segment)

    def _segment(self) -> None:
        self._segment_timer = None
        size, policy, fetch = self.expected_size, self.policy, self._fetch_range
        # A backend whose staged blobs cannot be written ahead gets one stream.
        if not self.active or size is None or fetch is None or not hasattr(self._staged, "ahead"):
            return
        if not worth_segmenting(size, self.received, SEGMENT_AFTER):
            return
        spans = plan(size, policy.segments, policy.segments_above, self.received)
        if len(spans) < 2:
            return
        self.log.info(
            "fetching {digest} in {count} segments: {rate} bytes a second on one connection",
            digest=str(self.digest),
            count=len(spans),
            rate=int(self.received / SEGMENT_AFTER),
        )
        self._segments = Segments(self, spans, fetch, self._mirrors())
        self._segments.start()

    @property
    def segmented(self) -> bool:
        return self._segments is not None

    # ByteSource, for the FileSenders that follow this fill.

    def read(self, offset: int, length: int) -> bytes:
        assert not self._closed
        if self._tail.start <= offset < self._tail.end:
            data = self._tail.read(offset, length)
        else:
            assert offset < self._on_disk, "a client fell behind the relay window"
            data = self._staged.read(offset, min(length, self._on_disk - offset))
        if self._relaying:
            self._trim()
        return data

    def available(self) -> int:
        # The last byte is held back until the blob has been verified.
        return self.received if self._complete else max(0, self.received - 1)

    def is_complete(self) -> bool:
        return self._complete

    def failure(self) -> Failure | None:
        return self._failure

    def subscribe(self, sender: Reader) -> None:
        self._senders.add(sender)

    def unsubscribe(self, sender: Reader) -> None:
        self._senders.discard(sender)
        if self._senders or not self.active:
            return
        if self._relaying:
            self._abandon("every client it was relayed to has gone")
        elif not self.policy.fill_without_clients:
            self._abandon("every client that wanted it has gone")

    def acquire(self) -> BlobFill:
        """Take a reference, for someone the fill is handed to."""
        assert not self._closed, "a fill was handed out after its last release"
        self._references += 1
        return self

    def release(self) -> None:
        self._references -= 1
        if self._references == 0 and not self._closed:
            self._closed = True
            self._staged.close()

    @property
    def active(self) -> bool:
        """Whether bytes are still arriving."""
        return not self._download_ended and self._failure is None

    def _has_ended(self) -> bool:
        return not self.active

    @property
    def _settled(self) -> bool:
        return self._complete or self._failure is not None

    # Driven by the download.

    def attach(self, download: FillFromResponse) -> None:
        """A response has started to feed the front of the download."""
        self._download = download
        if self._paused:
            # A resumed download, while the fill waits for its disk or clients.
            download.hold(True)

    def write(self, data: bytes, on_disk: bool = False) -> None:
        """
        The next bytes, in order, from whatever is the download's front;
        C{on_disk} when a segment wrote them into the file already.
        """
        if not self.active:
            return
        segments = self._segments
        while segments is not None and data:
            following = segments.next_start(self.received)
            if following is None or self.received + len(data) < following.start:
                break
            head = data[: following.start - self.received]
            data = data[len(head) :]
            self._take(head, on_disk)
            if self._has_ended():
                return  # a client's going may have abandoned it
            if following.ready:
                # The next segment has its bytes: the front's connection is
                # no longer needed, and what else it sent is the segment's.
                front, self._download = self._download, None
                if front is not None:
                    front.hand_over()
                following.take_over()
                return
            # The front carries on through the span of a segment that has failed.
            following.stop()
        self._take(data, on_disk)

    def _front_ended(self) -> None:
        """The front has handed all it had: finish, or resume from here."""
        self._download = None
        if not self.active:
            return
        if self.expected_size is not None and self.received >= self.expected_size:
            self.finish()
            return
        following = self._segments and self._segments.next_start(self.received - 1)
        if following and following.start == self.received and following.ready:
            following.take_over()
            return
        Deferred.fromCoroutine(self._resume_from(self.received)).addErrback(self.interrupted)

    def _take(self, data: bytes, on_disk: bool = False) -> None:
        self._staged.append(data, on_disk)
        self._tail.append(data)
        self.received += len(data)
        if self._on_data is not None:
            self._on_data(len(data))
        self._trim()
        self._notify()

    def _trim(self) -> None:
        """
        Catch up with the spool, drop what memory need not hold any more,
        and pause or resume the download by how much it holds.
        """
        self._on_disk = self._staged.written
        failure = self._staged.failure
        if failure is not None and not self._relaying and not self._settled:
            self._start_relaying(failure)
        keep_from = self._on_disk
        if self._relaying:
            slowest = min((s.offset for s in self._senders), default=self.received)
            keep_from = max(keep_from, slowest)
        self._tail.drop_before(keep_from)
        if self._tail.size > self.policy.relay_window:
            # The disk, or when relaying the slowest client, is a window behind.
            self._pause_download(True)
        elif self._tail.size <= self.policy.relay_window // 2:
            self._pause_download(False)
        if self._paused and not self._relaying:
            self._wait_for_disk()

    def _wait_for_disk(self) -> None:
        if not self._waiting_for_disk:
            self._waiting_for_disk = True
            self._staged.wake_on_progress(self._on_disk, self._disk_progressed)

    def _disk_progressed(self) -> None:
        self._waiting_for_disk = False
        if not self._settled:
            self._trim()
            self._notify()

    def _start_relaying(self, error: OSError) -> None:
        reason = f"cannot write to the cache: {error.strerror or error}"
        self.log.warn(
            "{digest}: {reason}; relaying it to its clients without caching it",
            digest=str(self.digest),
            reason=reason,
        )
        self.cacheable = False
        self._relaying = True
        if self._on_relay is not None:
            self._on_relay(self, reason)

    def _pause_download(self, paused: bool) -> None:
        self._paused = paused
        if self._download is not None:
            self._download.hold(paused)

    def finish(self) -> None:
        """The upstream response ended normally: check what arrived, once it is spooled."""
        if not self.active:
            return
        self._download_ended = True
        self._download = None
        self._stop_segments()
        self._staged.seal().addCallbacks(self._spooled, self.fail)

    def _stop_segments(self) -> None:
        timer, self._segment_timer = self._segment_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._segments is not None:
            self._segments.stop()

    def _spooled(self, hex_digest: str) -> None:
        if self._settled:
            return
        self._trim()
        try:
            check_blob(self.digest, self.expected_size, self.received, hex_digest)
        except BlobCheckFailed as e:
            self.fail(Failure(e))
            return
        self._complete = True
        if not self.cacheable:
            self._staged.abort()
        self._notify()
        self.verified.callback(self.received)

    def interrupted(self, reason: Failure) -> None:
        """The download was cut short: resume it, or give up."""
        if not self.active:
            return
        self._download = None
        if self._resume is None or self.resumes >= self.policy.resume_attempts:
            self.fail(reason)
            return
        self.resumes += 1
        self.log.warn(
            "download of {digest} from {source} cut after {received} bytes ({reason});"
            " resuming, attempt {attempt} of {attempts}",
            digest=str(self.digest),
            source=self.source,
            received=self.received,
            reason=describe_failure(reason),
            attempt=self.resumes,
            attempts=self.policy.resume_attempts,
        )
        Deferred.fromCoroutine(self._resume_from(self.received)).addErrback(self.interrupted)

    async def _resume_from(self, offset: int) -> None:
        assert self._resume is not None
        response = await self._resume(offset, self.source)
        if not self.active:
            response.response.deliverBody(_Discard())
            return
        skip = self._resumed_at(response, offset)
        self.source = response.mirror
        response.response.deliverBody(FillFromResponse(self, skip))

    def _resumed_at(self, response: UpstreamResponse, offset: int) -> int:
        """
        Check that a resumed response continues at C{offset}; return how
        many bytes of it to skip (all of those before C{offset}, when the
        mirror ignored the C{Range} and sent the whole blob).
        """
        if response.code == 200:
            length = response.content_length
            if None not in (length, self.expected_size) and length != self.expected_size:
                raise BlobCheckFailed(f"resumed from {response.mirror} with a different size")
            return offset
        match = _CONTENT_RANGE_RE.fullmatch(response.header("Content-Range") or "")
        total = match and match[3]
        if response.code != 206 or match is None or int(match[1]) != offset:
            raise BlobCheckFailed(
                f"{response.mirror} did not resume at byte {offset}"
                f" (HTTP {response.code}, Content-Range {response.header('Content-Range')!r})"
            )
        if (
            self.expected_size is not None
            and total != "*"
            and int(total or 0) != self.expected_size
        ):
            raise BlobCheckFailed(f"{response.mirror} resumed a blob of another size")
        return 0

    def fail(self, reason: Failure) -> None:
        """The download cannot complete: abort every client, drop the file."""
        if self._settled:
            return
        self._failure = reason
        self._pause_download(False)
        download, self._download = self._download, None
        if download is not None:
            download.stop()
        self._stop_segments()
        level = self.log.info if reason.check(FillAbandoned) else self.log.warn
        level(
            "download of {digest} failed after {received} bytes: {reason}",
            digest=str(self.digest),
            received=self.received,
            reason=describe_failure(reason),
        )
        self._tail.clear()
        self._staged.abort()
        self._notify()
        self.verified.errback(reason)
        # Whoever waits on "verified" has been told; the failure is handled.
        self.verified.addErrback(lambda _: None)

    def _abandon(self, why: str) -> None:
        self.fail(Failure(FillAbandoned(why)))

    def _notify(self) -> None:
        for sender in list(self._senders):
            sender.more_data()

    def commit(self, pinned: bool = False) -> Deferred[bool]:
        """Store the verified blob; if that fails, drop what was staged."""

        def stored(ok: bool) -> bool:
            if not ok:
                self._staged.abort()
            return ok

        return self._staged.commit(self.digest, self.received, pinned).addCallback(stored)


class FillFromResponse(Protocol):
    """
    Feeds an upstream response body into a L{BlobFill}, skipping its first
    C{skip} bytes, and cuts the connection if it goes quiet for the fill's
    C{body_timeout}.

    The stall timer is not re-armed for every chunk, which would cost a
    timer cancel and a new timer per 64 KiB: each chunk only notes the time,
    and the timer, when it fires, re-arms itself for whatever is left.
    """

    def __init__(self, fill: BlobFill, skip: int = 0, sink: _Sink | None = None) -> None:
        self._fill = fill
        self._sink: _Sink = sink or fill
        self._skip = skip
        self._timer: IDelayedCall | None = None
        self._last_data = 0.0
        self._held = False
        self._stopped = False

    def connectionMade(self) -> None:
        self._wind()
        self._sink.attach(self)

    def _wind(self) -> None:
        """Start the stall timer afresh, or stop it while the download is held or done."""
        self._cancel_timer()
        if not self._held and not self._stopped:
            self._last_data = self._fill.clock.seconds()
            self._arm(self._fill.policy.body_timeout)

    def _arm(self, delay: float) -> None:
        self._timer = self._fill.clock.callLater(delay, self._check_stall)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _check_stall(self) -> None:
        self._timer = None
        quiet = self._fill.clock.seconds() - self._last_data
        timeout = self._fill.policy.body_timeout
        if quiet < timeout:
            self._arm(timeout - quiet)
            return
        self._fill.log.warn(
            "download of {digest} from {source}: nothing received for {timeout}s",
            digest=str(self._fill.digest),
            source=self._sink.source,
            timeout=timeout,
        )
        self.stop()

    def hold(self, held: bool) -> None:
        """Pause or resume reading from the upstream (a relaying fill's backpressure)."""
        if held == self._held or self.transport is None:
            return
        self._held = held
        producer = IPushProducer(self.transport)
        if held:
            producer.pauseProducing()
        else:
            producer.resumeProducing()
        self._wind()

    def hand_over(self) -> None:
        """Cut the connection: a segment has the rest, and its end is not an interruption."""
        self._sink = _Ignore()
        self.stop()

    def stop(self) -> None:
        """Cut the upstream connection."""
        self._stopped = True
        self._wind()
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._last_data = self._fill.clock.seconds()
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        if data:
            self._sink.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopped = True
        self._wind()
        if reason.check(ResponseDone, PotentialDataLoss):
            self._sink.finish()
        else:
            self._sink.interrupted(reason)


class _Front(TypingProtocol):
    """What the fill pauses, stops, or lets go of when a segment takes over."""

    def hold(self, held: bool) -> None: ...

    def stop(self) -> None: ...

    def hand_over(self) -> None: ...


class _Sink(TypingProtocol):
    """Where a L{FillFromResponse} puts what it receives: the fill, or a segment of it."""

    source: str

    def attach(self, download: FillFromResponse) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def interrupted(self, reason: Failure) -> None: ...


class _Ignore:
    """The sink of a connection handed over: what it still says goes nowhere."""

    source = ""

    def attach(self, download: FillFromResponse) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass

    def interrupted(self, reason: Failure) -> None:
        pass


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass
