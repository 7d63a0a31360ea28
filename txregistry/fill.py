"""
Downloading a blob from upstream while clients read it.

A L{BlobFill} writes the upstream's bytes to a temporary file and hashes
them as they arrive.  Any number of L{FileSender}s follow the file as it
grows, each at its own pace.  None of them is given the last byte until the
size and digest have been checked: a client can never take a corrupt or
truncated blob for a complete one, because its response ends only after the
check.  On a mismatch, or a cut connection, every client's connection is
aborted and the temporary file is removed.

L{StreamThrough} is the fallback when a blob cannot be cached: it pipes the
upstream response straight to one client, with backpressure both ways, and
checks it the same way.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

from txregistry.reference import Digest
from txregistry.sender import FileSender, abort_connection


class BlobCheckFailed(Exception):
    """What the upstream sent is not the blob that was asked for."""


def _check(digest: Digest, expected_size: int | None, received: int, actual_hex: str) -> None:
    if expected_size is not None and received != expected_size:
        raise BlobCheckFailed(
            f"upstream sent {received} bytes of {digest}, but announced {expected_size}"
        )
    if actual_hex != digest.hex:
        raise BlobCheckFailed(
            f"upstream sent content with digest {digest.algorithm}:{actual_hex} for {digest}"
        )


class BlobFill:
    """
    One upstream download of one blob into a temporary file.

    The file is reference counted (see L{ByteSource}): the owner that
    creates the fill and hands it to clients holds the first reference, and
    takes another for each client it hands it to.

    @ivar verified: fires with the blob's size once all of it has arrived
        and matched its digest, or fails with the reason it never will.
    """

    log = Logger()

    def __init__(
        self, digest: Digest, expected_size: int | None, fd: int, path: str, source: str
    ) -> None:
        self.digest = digest
        self.source = source
        self.expected_size = expected_size
        self.path = path
        self.received = 0
        self.verified: Deferred[int] = Deferred()
        self._fd: int | None = fd
        self._hash = digest.hasher()
        self._complete = False
        self._failure: Failure | None = None
        self._senders: set[FileSender] = set()
        self._references = 1

    # ByteSource, for the FileSenders that follow this fill.

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def available(self) -> int:
        # The last byte is held back until the blob has been verified.
        return self.received if self._complete else max(0, self.received - 1)

    def is_complete(self) -> bool:
        return self._complete

    def failure(self) -> Failure | None:
        return self._failure

    def subscribe(self, sender: FileSender) -> None:
        self._senders.add(sender)

    def unsubscribe(self, sender: FileSender) -> None:
        self._senders.discard(sender)

    def acquire(self) -> BlobFill:
        """Take a reference, for someone the fill is handed to."""
        assert self._fd is not None, "a fill was handed out after its last release"
        self._references += 1
        return self

    def release(self) -> None:
        self._references -= 1
        if self._references == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def active(self) -> bool:
        """Whether bytes are still arriving."""
        return not self._complete and self._failure is None

    # Driven by the upstream response.

    def write(self, data: bytes) -> None:
        if not self.active:
            return
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as e:
            self.fail(Failure(e))
            return
        self._hash.update(data)
        self.received += len(data)
        self._notify()

    def finish(self) -> None:
        """The upstream response ended normally: check what arrived."""
        if not self.active:
            return
        try:
            _check(self.digest, self.expected_size, self.received, self._hash.hexdigest())
        except BlobCheckFailed as e:
            self.fail(Failure(e))
            return
        self._complete = True
        self._notify()
        self.verified.callback(self.received)

    def fail(self, reason: Failure) -> None:
        """The download cannot complete: abort every client, drop the file."""
        if not self.active:
            return
        self._failure = reason
        self.log.warn(
            "download of {digest} failed after {received} bytes: {reason}",
            digest=str(self.digest),
            received=self.received,
            reason=reason.getErrorMessage(),
        )
        self.discard_file()
        self._notify()
        self.verified.errback(reason)
        # Whoever waits on "verified" has been told; the failure is handled.
        self.verified.addErrback(lambda _: None)

    def _notify(self) -> None:
        for sender in list(self._senders):
            sender.more_data()

    def discard_file(self) -> None:
        """Remove the download file, if it is still there."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class FillFromResponse(Protocol):
    """Feeds an upstream response body into a L{BlobFill}."""

    def __init__(self, fill: BlobFill) -> None:
        self._fill = fill

    def dataReceived(self, data: bytes) -> None:
        self._fill.write(data)
        if self._fill.failure() is not None and self.transport is not None:
            # The fill gave up (the disk is full, say): stop downloading.
            IPushProducer(self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self._fill.finish()
        else:
            self._fill.fail(reason)


@implementer(IPushProducer)
class StreamThrough(Protocol):
    """
    Pipes an upstream blob straight to one client, without caching it.

    The client's backpressure pauses the upstream connection, so memory
    stays flat.  The last byte is held back until the digest matches.
    """

    log = Logger()

    def __init__(self, request: Request, digest: Digest, expected_size: int | None) -> None:
        self._request = request
        self._digest = digest
        self._expected_size = expected_size
        self._hash = digest.hasher()
        self._received = 0
        self._held = b""
        self._client_gone = False
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self._client_gone:
            return
        self._hash.update(data)
        self._received += len(data)
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
                raise BlobCheckFailed(f"upstream connection lost: {reason.getErrorMessage()}")
            _check(self._digest, self._expected_size, self._received, self._hash.hexdigest())
        except BlobCheckFailed as e:
            self.log.warn("streaming {digest} failed: {why}", digest=str(self._digest), why=str(e))
            abort_connection(self._request)
        else:
            self._request.write(self._held)
            self._request.finish()
        self.done.callback(None)

    # IPushProducer, driven by the client's transport.

    # The upstream body's transport (Twisted's TransportProxyProducer) is a
    # push producer: pausing it stops reading from the upstream socket.

    def pauseProducing(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).resumeProducing()

    def stopProducing(self) -> None:
        self._client_gone = True
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()
