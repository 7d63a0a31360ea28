"""
Sending a file to an HTTP client, as fast as the client takes it.

One producer, L{FileSender}, serves both a finished file from the cache and
a download still in progress (a L{txregistry.repository.fill.BlobFill}): it reads from
the source at its own offset, up to what the source says may be sent, and
waits when it catches up.  A slow client therefore costs a file offset, not
memory, and never slows the download or other clients.
"""

from __future__ import annotations

import os
from typing import IO, Protocol, cast

from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

# How much is read from disk and written to the transport at a time: the
# fastest of 64 KiB to 1 MiB in bench/, for one client and for eight.
CHUNK_SIZE = 256 << 10


class ByteSource(Protocol):
    """
    A file that L{FileSender}s read, which may still be growing.

    It is reference counted: whoever hands a source to someone takes a
    reference for them, and every holder calls L{release} once.  The file
    is closed with the last reference.
    """

    def read(self, offset: int, length: int) -> bytes:
        """Up to C{length} bytes from C{offset}, which is below L{available}."""

    def available(self) -> int:
        """How many bytes, from the start of the file, may be sent now."""

    def is_complete(self) -> bool:
        """Whether L{available} is the whole file and will not grow."""

    def failure(self) -> Failure | None:
        """Why the file will never be complete, if it won't."""

    def subscribe(self, sender: FileSender) -> None:
        """Call C{sender.more_data()} whenever there is news."""

    def unsubscribe(self, sender: FileSender) -> None: ...

    def release(self) -> None:
        """Drop one reference."""


class CompleteFile:
    """A finished file, such as a blob from the cache, with one reference."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file = file
        self._size = size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset)

    def available(self) -> int:
        return self._size

    def is_complete(self) -> bool:
        return True

    def failure(self) -> Failure | None:
        return None

    def subscribe(self, sender: FileSender) -> None:
        pass

    def unsubscribe(self, sender: FileSender) -> None:
        pass

    def release(self) -> None:
        self._file.close()


def abort_connection(request: Request) -> None:
    """
    Cut a response short: the client sees a broken connection, not an
    ending, and knows to retry.  Used once the status line has gone out.
    """
    channel = request.channel
    if channel is not None and channel.transport is not None:
        cast(ITCPTransport, channel.transport).abortConnection()


@implementer(IPushProducer)
class FileSender:
    """
    Writes bytes C{start} to C{end} of a L{ByteSource} into a request, then
    finishes it.  If the source fails, the client's connection is aborted
    rather than finished, so that the client knows the response is broken.

    The sender takes over one reference to the source, and releases it when
    it is done, whether the response finished or the client went away.
    """

    log = Logger()

    def __init__(
        self, source: ByteSource, request: Request, start: int = 0, end: int | None = None
    ) -> None:
        self._source = source
        self._request = request
        self._offset = start
        self._end = end
        self._paused = False
        self._done = False
        self._pumping = False

    @property
    def offset(self) -> int:
        return self._offset

    def begin(self) -> None:
        """Start sending; the response headers must already be set."""
        self._source.subscribe(self)
        self._request.registerProducer(self, True)
        # The transport normally tells us the client went away, through
        # stopProducing; this covers any that does not.
        self._request.notifyFinish().addErrback(lambda _: self._close())
        self.more_data()

    # IPushProducer, driven by the client's transport.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.more_data()

    def stopProducing(self) -> None:
        """The client went away: let go of the source."""
        self._close()

    # Driven by the source.

    def more_data(self) -> None:
        """The source has more for us, has completed, or has failed."""
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump()
        finally:
            self._pumping = False

    def _pump(self) -> None:
        source = self._source
        while not self._done and not self._paused:
            limit = source.available()
            if self._end is not None:
                limit = min(limit, self._end)
            if self._offset < limit:
                data = source.read(self._offset, min(CHUNK_SIZE, limit - self._offset))
                if not data:
                    self._abort(f"file ended early at byte {self._offset}")
                    return
                self._offset += len(data)
                self._request.write(data)
                continue
            failure = source.failure()
            if failure is not None:
                self._abort(failure.getErrorMessage())
            elif self._offset == self._end or (
                source.is_complete() and self._offset == source.available()
            ):
                self._finish()
            return

    def _finish(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self, why: str) -> None:
        self.log.info("aborting response to {client}: {why}", client=self._client(), why=why)
        self._close()
        self._request.unregisterProducer()
        abort_connection(self._request)

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._source.unsubscribe(self)
            self._source.release()

    def _client(self) -> str:
        client = self._request.getClientAddress()
        return str(getattr(client, "host", client))
