"""
Sending a file to an HTTP client, as fast as the client takes it.

One producer, L{FileSender}, serves every L{ByteSource}: a stored blob, or
a download still in progress (a L{txregistry.repository.fill.BlobFill}).  It
reads from the source at its own offset, up to what the source says may be
sent, and waits when it catches up.  A slow client therefore costs a file
offset, not memory, and never slows the download or other clients.

L{StreamThrough} pipes an upstream body straight to one client when a blob
is not to be cached at all (it is larger than the cache, say).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

from txregistry.oci.reference import Digest
from txregistry.oci.verify import BlobCheckFailed, check_blob
from txregistry.storage.interface import ByteSource
from txregistry.upstream.bodies import describe_failure

# How much is read from disk and written to the transport at a time: the
# fastest of 64 KiB to 1 MiB in bench/, for one client and for eight.
CHUNK_SIZE = 256 << 10


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
        return client_host(self._request)


def client_host(request: Request) -> str:
    """The client's address, for logs."""
    client = request.getClientAddress()
    return str(getattr(client, "host", client))


@implementer(IPushProducer)
class StreamThrough(Protocol):
    """
    Pipes an upstream blob straight to one client, without caching it.

    The client's backpressure pauses the upstream connection, so memory
    stays flat.  The last byte is held back until the digest matches.
    """

    log = Logger()

    def __init__(
        self,
        request: Request,
        digest: Digest,
        expected_size: int | None,
        on_data: Callable[[int], None] | None = None,
    ) -> None:
        self._request = request
        self._on_data = on_data
        self._digest = digest
        self._expected_size = expected_size
        self._hash = digest.hasher()
        self._received = 0
        self._held = b""
        self._client_gone = False
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())

    def dataReceived(self, data: bytes) -> None:
        if self._client_gone:
            return
        self._hash.update(data)
        self._received += len(data)
        if self._on_data is not None:
            self._on_data(len(data))
        out, self._held = self._held + data[:-1], data[-1:]
        if out:
            self._request.write(out)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._client_gone:
            self.done.callback(None)
            return
        self._request.unregisterProducer()
        try:
            if not reason.check(ResponseDone, PotentialDataLoss):
                raise BlobCheckFailed(f"upstream connection lost: {describe_failure(reason)}")
            check_blob(self._digest, self._expected_size, self._received, self._hash.hexdigest())
        except BlobCheckFailed as e:
            self.log.warn("streaming {digest} failed: {why}", digest=str(self._digest), why=str(e))
            abort_connection(self._request)
        else:
            self._request.write(self._held)
            self._request.finish()
        self.done.callback(None)

    # The upstream body's transport (Twisted's TransportProxyProducer) is a
    # push producer: pausing it stops reading from the upstream socket.

    def pauseProducing(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).resumeProducing()

    def stopProducing(self) -> None:
        if self._client_gone:
            return
        self._client_gone = True
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()
