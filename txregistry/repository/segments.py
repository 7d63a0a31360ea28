"""
Segmented downloads: a large blob fetched as several concurrent C{Range}
requests, so that an upstream that serves each connection slowly is not
the pace of a cold pull.

The fill's own response (the I{front}) starts at byte 0 and is consumed in
order, as for any download.  Each further segment asks for its span
(C{bytes=start-end}), from the mirrors in turn, digest-only ones included,
since every byte is verified.  While a segment is ahead of the front its
bytes go straight to where they belong in the download's file (an
L{txregistry.storage.staging.AheadFile}), a couple of MiB at a time, its
connection paused while a write is pending: memory stays bounded whatever
the blob's size.  When the front reaches a segment's first byte, it cuts
its own connection and the segment I{takes over}: what it has on disk is
read back and handed to the fill in order (appended, so written again in
place, and hashed), and from then on its connection feeds the fill
directly.  Clients, the hash and the last-byte rule see one in-order
stream, exactly as without segments.

Nothing here trusts a segment more than the front: a segment that is cut is
resumed from the byte it had, as a cut download is; one whose mirror ignores
the C{Range} (HTTP 200) or answers anything else is dropped, and the front
(or a resumed stream from the byte the fill has) carries on through its
span as one stream.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txregistry.upstream.bodies import describe_failure
from txregistry.upstream.client import UpstreamResponse

if TYPE_CHECKING:
    from txregistry.repository.fill import BlobFill, FillFromResponse

# Segments start on MiB boundaries, so that the file's writes stay aligned.
ALIGN = 1 << 20
# How many bytes a segment ahead of the front keeps in memory, waiting for
# its write to the file, before it pauses its connection.
AHEAD_BUFFER = 2 << 20
# How much is read back from the file at a time when a segment takes over.
READ_BACK = 1 << 20

_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


# Asks the upstream for bytes C{start} to C{end} (excluded) of the blob,
# from the mirror with URL C{first} if it can.
FetchRange = Callable[[int, int, str | None], Awaitable[UpstreamResponse]]


# A download is segmented only if, this many seconds after it started, its
# one connection has been slower than FAST_CONNECTION, and at that rate it
# would need more than WORTH_IT seconds more.  A fast upstream (a loopback
# one, or a machine that is itself the limit) is left to one connection,
# which costs the machine less and asks the upstream for less.
SEGMENT_AFTER = 0.25
WORTH_IT = 1.0
FAST_CONNECTION = 64 << 20


def plan(size: int | None, segments: int, above: int, front: int = 0) -> list[tuple[int, int]]:
    """
    The spans C{(start, end)} to fetch a blob of C{size} bytes in, the
    first of them the front's, which has C{front} bytes already: one span
    for a blob of unknown size or of at most C{above} bytes, else up to
    C{segments}, sharing what the front does not have, each starting on a
    MiB boundary.
    """
    if size is None or segments <= 1 or size <= above:
        return [(0, size or 0)]
    step = -(-(size - front) // segments)
    starts = sorted({-(-(front + k * step) // ALIGN) * ALIGN for k in range(1, segments)})
    starts = [0, *(start for start in starts if front < start < size)]
    return list(zip(starts, [*starts[1:], size], strict=True))


def worth_segmenting(size: int, received: int, seconds: float) -> bool:
    """Whether a download with C{received} of C{size} bytes after C{seconds} is slow enough."""
    remaining = size - received
    slow = received < FAST_CONNECTION * seconds
    return slow and remaining > 0 and remaining * seconds > WORTH_IT * received


class Segments:
    """The segments of one fill after its first: who holds which span."""

    log = Logger()

    def __init__(
        self,
        fill: BlobFill,
        spans: list[tuple[int, int]],
        fetch: FetchRange,
        mirrors: list[str],
    ) -> None:
        self.fill = fill
        self.file = fill._staged.ahead()
        self.fetch = fetch
        self.ranges_ignored = False
        self.segments = [
            Segment(self, start, end, mirrors[i % len(mirrors)] if mirrors else None)
            for i, (start, end) in enumerate(spans[1:], 1)
        ]
        self._closed = False

    def start(self) -> None:
        for segment in self.segments:
            segment.request()

    def next_start(self, offset: int) -> Segment | None:
        """The first segment that starts after C{offset}."""
        for segment in self.segments:
            if segment.start > offset:
                return segment
        return None

    def stop(self) -> None:
        """The fill has ended, one way or the other: drop every segment, close the file."""
        if self._closed:
            return
        self._closed = True
        for segment in self.segments:
            segment.stop()
        self.file.close()

    def ignored_range(self, mirror: str) -> None:
        if not self.ranges_ignored:
            self.ranges_ignored = True
            self.log.warn(
                "{mirror} ignored a Range request for {digest}: fetching it as one stream",
                mirror=mirror,
                digest=str(self.fill.digest),
            )


class Segment:
    """
    One span of a segmented download, after the first.

    It is the sink of its own L{FillFromResponse} (which times out a quiet
    connection as for any download).  Ahead of the front, what arrives is
    written to the file; once it has L{take_over}, the fill's front, it is
    read back and then passed on as it arrives.
    """

    def __init__(self, segments: Segments, start: int, end: int, mirror: str | None) -> None:
        self.segments = segments
        self.fill = segments.fill
        self.start = start
        self.end = end
        self.source = mirror or ""
        self.digest = self.fill.digest
        # requesting, receiving, complete, failed (it will get no more bytes)
        # or stopped (dropped; it is nobody's any more).
        self.state = "requesting"
        self.resumes = 0
        # Bytes of the span received, in the file, and handed to the fill.
        self.received = 0
        self.flushed = 0
        self.handed = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flushing = False
        self._reading = False
        # Set while it hands the fill bytes: the fill may call back (hold)
        # before it has taken them in.
        self._handing = False
        self._download: FillFromResponse | None = None
        self._failure: Failure | None = None
        # Whether it is the fill's front, and whether it has caught up and
        # passes bytes on as they arrive.
        self.front = False
        self.live = False
        self._held_by_fill = False

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def ready(self) -> bool:
        """
        Whether it can take over: it has, or is getting, bytes of its own.
        One that failed with bytes in the file, or a write of them still
        running, takes over too: the front must not write where a write of
        the segment may still land.
        """
        if self.state == "failed":
            return self._flushing or self.handed < self.flushed
        return self.state in ("receiving", "complete") or (
            self.state == "requesting" and self.received > 0
        )

    # Asking the upstream.

    def request(self) -> None:
        if self.state == "stopped":
            return
        offset = self.start + self.received
        d = Deferred.fromCoroutine(self._request(offset))
        d.addErrback(self._lost)

    async def _request(self, offset: int) -> None:
        response = await self.segments.fetch(offset, self.end, self.source or None)
        if self.state == "stopped":
            response.response.deliverBody(_Abort())
            return
        problem = self._check(response, offset)
        if problem is not None:
            response.response.deliverBody(_Abort())
            if response.code == 200:
                self.segments.ignored_range(response.mirror)
            self._fail(Failure(ValueError(problem)))
            return
        from txregistry.repository.fill import FillFromResponse

        self.source = response.mirror
        self.state = "receiving"
        response.response.deliverBody(FillFromResponse(self.fill, sink=self))

    def _check(self, response: UpstreamResponse, offset: int) -> str | None:
        """Why C{response} is not bytes C{offset} to C{end} of this blob, or None."""
        wanted = f"bytes {offset}-{self.end - 1}"
        content_range = response.header("Content-Range") or ""
        match = _CONTENT_RANGE_RE.fullmatch(content_range)
        expected = self.fill.expected_size
        if (
            response.code != 206
            or match is None
            or (int(match[1]), int(match[2])) != (offset, self.end - 1)
            or (match[3] != "*" and expected is not None and int(match[3]) != expected)
        ):
            return (
                f"{response.mirror} did not send {wanted}/{expected}"
                f" (HTTP {response.code}, Content-Range {content_range!r})"
            )
        return None

    # The sink of its FillFromResponse.

    def attach(self, download: FillFromResponse) -> None:
        self._download = download
        self._update_hold()

    def write(self, data: bytes) -> None:
        if self.state != "receiving":
            return
        data = data[: self.length - self.received]
        if not data:
            return
        self.received += len(data)
        if self.live:
            self.flushed = self.handed = self.received
            self._hand(data)
            if not self._handed_over():
                self._catch_up()
            return
        self._pending.append(data)
        self._pending_size += len(data)
        self._flush()
        self._update_hold()

    def finish(self) -> None:
        self._download = None
        if self.state != "receiving":
            return
        if self.received < self.length:
            self.interrupted(Failure(ValueError(f"the response ended after {self.received} bytes")))
            return
        self.state = "complete"
        self._catch_up()

    def interrupted(self, reason: Failure) -> None:
        self._download = None
        if self.state != "receiving":
            return
        policy = self.fill.policy
        if self.segments.ranges_ignored or self.resumes >= policy.resume_attempts:
            self._fail(reason)
            return
        self.resumes += 1
        self.segments.log.warn(
            "segment {start}-{end} of {digest} from {source} cut after {received} bytes"
            " ({reason}); resuming, attempt {attempt} of {attempts}",
            start=self.start,
            end=self.end - 1,
            digest=str(self.digest),
            source=self.source,
            received=self.received,
            reason=describe_failure(reason),
            attempt=self.resumes,
            attempts=policy.resume_attempts,
        )
        self.state = "requesting"
        self.request()

    def _lost(self, reason: Failure) -> None:
        """The request for the segment, or its resumption, failed."""
        if self.state in ("requesting", "receiving"):
            self._fail(reason)

    def _fail(self, reason: Failure) -> None:
        if self.state in ("failed", "stopped"):
            return
        self.state = "failed"
        self._failure = reason
        self._pending, self._pending_size = [], 0
        self.segments.log.info(
            "segment {start}-{end} of {digest} failed after {received} bytes: {reason}",
            start=self.start,
            end=self.end - 1,
            digest=str(self.digest),
            received=self.received,
            reason=describe_failure(reason),
        )
        self._catch_up()

    # Writing ahead of the front.

    def _flush(self) -> None:
        if self._flushing or not self._pending or self.state in ("failed", "stopped"):
            return
        chunks, self._pending = self._pending, []
        size, self._pending_size = self._pending_size, 0
        self._flushing = True
        d = self.segments.file.write_at(self.start + self.flushed, chunks)
        d.addCallbacks(self._flushed, self._write_failed, callbackArgs=(size,))

    def _flushed(self, _: object, size: int) -> None:
        self._flushing = False
        if self.state == "stopped":
            return
        self.flushed += size
        self._flush()
        self._update_hold()
        self._catch_up()

    def _write_failed(self, reason: Failure) -> None:
        self._flushing = False
        if self._download is not None:
            self._download.stop()
        self._fail(reason)
        # Already failed (its connection was cut), it may be the front, waiting.
        self._catch_up()

    def _update_hold(self) -> None:
        if self._download is not None:
            held = self._pending_size >= AHEAD_BUFFER or (self.live and self._held_by_fill)
            self._download.hold(held)

    # The front.

    def take_over(self) -> None:
        """The fill has every byte before C{start}: hand it the rest, in order."""
        self.front = True
        self.fill._download = self
        self._held_by_fill = self.fill._paused
        self._catch_up()

    def hold(self, held: bool) -> None:
        """The fill pauses or resumes its front."""
        self._held_by_fill = held
        self._update_hold()
        if not held:
            self._catch_up()

    def hand_over(self) -> None:
        """The next segment takes over: this one has handed all of its span."""
        self.front = self.live = False

    def _handed_over(self) -> bool:
        """Whether the next segment took over (within the fill's write)."""
        return not self.front

    def stop(self) -> None:
        """Drop the segment: nothing it has or gets goes anywhere any more."""
        if self.state == "stopped":
            return
        self.state = "stopped"
        self.front = self.live = False
        self._pending, self._pending_size = [], 0
        download, self._download = self._download, None
        if download is not None:
            download.stop()

    def _catch_up(self) -> None:
        """As the front: hand the fill what it can, in order, from the file, then live."""
        if not self.front or self._reading or self._held_by_fill or self._handing:
            return
        if self.live and self.state in ("receiving", "requesting"):
            return
        if self.handed < self.flushed:
            self._reading = True
            offset = self.start + self.handed
            length = min(READ_BACK, self.flushed - self.handed)
            d = self.segments.file.read_at(offset, length)
            d.addCallbacks(self._read_back, self._read_failed)
            return
        if self._flushing:
            return  # _flushed carries on
        if self._pending:
            chunks, self._pending, self._pending_size = self._pending, [], 0
            for chunk in chunks:
                self.handed += len(chunk)
                self.flushed = self.handed
                self._hand(chunk)
                if self._handed_over():
                    return
        if self.state in ("receiving", "requesting"):
            self.live = True
            self._update_hold()
            return
        # Complete, or failed: the fill goes on to the next segment, or
        # resumes from the byte it has.
        self.front = False
        self.fill._front_ended()

    def _read_back(self, data: bytes) -> None:
        self._reading = False
        if not self.front:
            return
        if not data:
            where = self.start + self.handed
            self._read_failed(Failure(EOFError(f"the download file ended at byte {where}")))
            return
        self.handed += len(data)
        self._hand(data, on_disk=True)
        self._catch_up()

    def _hand(self, data: bytes, on_disk: bool = False) -> None:
        self._handing = True
        try:
            self.fill.write(data, on_disk)
        finally:
            self._handing = False

    def _read_failed(self, reason: Failure) -> None:
        self._reading = False
        if self.front:
            self.front = False
            self.stop()
            self.fill.interrupted(reason)


class _Abort(Protocol):
    """Receives a response body that is not wanted by cutting its connection."""

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        IPushProducer(transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass
