"""
The request bodies of a push: one chunk of a blob at a time, read from the
source as the connection takes it.

L{ChunkProducer} is a push producer, as Twisted's HTTP client wants a
request body to be (it registers the body with the transport as a streaming
producer): it writes until the transport pauses it, so that a 50 MiB chunk
costs one read buffer of memory, not 50 MiB.  Each write pokes a
L{Watchdog}, which cuts a request that makes no progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

# As much as L{txregistry.http.senders} reads at a time to serve a blob.
READ_SIZE = 256 << 10


class PushSource(Protocol):
    """
    The bytes of a blob to push: a stored blob's L{ByteSource}, or bytes
    that C{doctor --push} generates.
    """

    def read(self, offset: int, length: int) -> bytes:
        """Up to C{length} bytes from C{offset}."""


class BodyCut(Exception):
    """The request body could not be sent whole; the message says why."""


@implementer(IBodyProducer)
class ChunkProducer:
    """
    Bytes C{start} to C{start + length} of C{source}, as a request body.

    @ivar sent: how many bytes have been handed to the connection so far.
    """

    def __init__(
        self,
        source: PushSource,
        start: int,
        length: int,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.length = length if length >= 0 else UNKNOWN_LENGTH
        self.sent = 0
        self._source = source
        self._start = start
        self._on_progress = on_progress
        self._consumer: IConsumer | None = None
        self._finished: Deferred[None] | None = None
        self._paused = False
        self._pumping = False
        self._stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        finished: Deferred[None] = Deferred()
        self._finished = finished
        self._pump()
        return finished

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        # The connection went away; Twisted's client fails the request itself,
        # and must not be told about this body again.
        self._stopped = True

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and not self._stopped and self._finished is not None:
                remaining = int(self.length) - self.sent
                if remaining <= 0:
                    finished, self._finished = self._finished, None
                    finished.callback(None)
                    return
                data = self._source.read(self._start + self.sent, min(READ_SIZE, remaining))
                if not data:
                    finished, self._finished = self._finished, None
                    finished.errback(
                        BodyCut(f"the blob ended early, at byte {self._start + self.sent}")
                    )
                    return
                self.sent += len(data)
                assert self._consumer is not None
                self._consumer.write(data)
                self._on_progress()
        finally:
            self._pumping = False


class Watchdog:
    """
    Calls C{expire} once C{seconds} pass without a L{poke}: a request whose
    body or answer stalls is cut, however long it may take while it moves.
    """

    def __init__(self, clock: IReactorTime, seconds: float, expire: Callable[[], None]) -> None:
        self._clock = clock
        self.seconds = seconds
        self._expire = expire
        self.expired = False
        self._call: IDelayedCall | None = clock.callLater(seconds, self._fire)

    def poke(self, seconds: float | None = None) -> None:
        """Progress: start counting again, for C{seconds} if given."""
        if seconds is not None:
            self.seconds = seconds
        if self._call is not None and self._call.active():
            self._call.reset(self.seconds)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self.expired = True
        self._expire()
