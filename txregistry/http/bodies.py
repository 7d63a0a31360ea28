"""
Request bodies handed on as they arrive, for pushes.

Twisted's L{Request} keeps a whole body (in memory, or in a temporary file
past 100 kB) and only then renders the request.  A pushed layer of 1 GiB
would be written twice (once there, once to the staged blob), and held
until its last byte.  L{RegistryRequest} instead renders every request that
may carry a body (any method but GET and HEAD) as soon as its headers are
in, and hands the body to whoever the resource attaches to its
L{StreamedBody}, with flow control: reading from the client pauses while
the consumer is behind.

An answer given before the whole body arrived (an error, a refusal) is
held until the body is in when at most L{HOLD_LIMIT} bytes of it are still
to come, and the connection stays open, as Go's HTTP server does: the body
is read and dropped first.  A client that answers a 401 by sending the
request again needs that: containerd writes a manifest PUT's body through
a pipe, and an answer that arrives while the body is still being written
leaves its retry without a body (issue 12).  A longer body, or one the
client waits for a C{100 Continue} to send, is answered at once, and the
connection closes once up to L{DISCARD_LIMIT} more bytes have been read
and dropped, so that the client sees the answer rather than a reset.
"""

from __future__ import annotations

import io
from typing import Any, Protocol
from urllib.parse import parse_qs

from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

# How much the body may run ahead of a consumer that has not attached yet
# (an access check in progress) before reading pauses.
PENDING_LIMIT = 1 << 20
# How much of a body is read and dropped after an early answer.
DISCARD_LIMIT = 1 << 20
# How much of a body may still be to come for an early answer to wait for
# it (Go's net/http server: maxPostHandlerReadBytes).
HOLD_LIMIT = 256 << 10

_BODILESS = (b"GET", b"HEAD")
# The largest body Twisted may keep for a request outside /v2/ (the token
# realm's form, a few hundred bytes): Twisted holds a body whole and parses
# a form of any size into memory.  A larger one, or one of unknown length,
# is streamed instead, and refused (L{RegistryRequest.body_too_large}).
SMALL_BODY_LIMIT = 64 << 10


class BodyConsumer(Protocol):
    def body_data(self, data: bytes) -> None:
        """More of the body, in order."""

    def body_end(self) -> None:
        """The body is complete."""


class _Discard:
    """Reads and drops a body nobody wants, then closes the connection."""

    def __init__(self, body: StreamedBody) -> None:
        self._body = body
        self._dropped = 0

    def body_data(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > DISCARD_LIMIT:
            self._body.close_connection()

    def body_end(self) -> None:
        pass


class StreamedBody:
    """
    The body of one request, delivered to one consumer as it arrives.

    @ivar length: the C{Content-Length}, or L{None} for a chunked body.
    @ivar received: how many bytes have arrived.
    """

    def __init__(self, request: RegistryRequest, length: int | None) -> None:
        self._request = request
        self.length = length
        self.received = 0
        # A body of no bytes has ended before it begins.
        self.ended = length == 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._consumer: BodyConsumer | None = None
        self._paused_by: set[str] = set()
        self._closed = False

    @property
    def attached(self) -> bool:
        return self._consumer is not None

    def attach(self, consumer: BodyConsumer) -> None:
        """Hand the body to C{consumer}: what arrived so far at once, the rest as it comes."""
        assert self._consumer is None, "a request body was attached twice"
        self._consumer = consumer
        pending, self._pending, self._pending_size = self._pending, [], 0
        self.resume("pending")
        for data in pending:
            consumer.body_data(data)
        if self.ended:
            consumer.body_end()

    def discard(self) -> None:
        """Nobody wants the body: drop it (the connection closes after an early answer)."""
        if self._consumer is None:
            self.attach(_Discard(self))
        elif not isinstance(self._consumer, _Discard):
            self._consumer = _Discard(self)
        if self._paused_by:
            self._paused_by.clear()
            self._producer().resumeProducing()

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self._consumer is not None:
            self._consumer.body_data(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > PENDING_LIMIT:
            self.pause("pending")

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self._consumer is not None:
            self._consumer.body_end()

    def pause(self, reason: str = "consumer") -> None:
        """Stop reading from the client until L{resume} with the same reason."""
        if not self._paused_by:
            self._producer().pauseProducing()
        self._paused_by.add(reason)

    def resume(self, reason: str = "consumer") -> None:
        if reason in self._paused_by:
            self._paused_by.discard(reason)
            if not self._paused_by:
                self._producer().resumeProducing()

    def close_connection(self) -> None:
        channel = getattr(self._request, "channel", None)
        self._closed = True
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()

    def _producer(self) -> IPushProducer:
        # Twisted drops the request's channel once it is done with it.
        channel = getattr(self._request, "channel", None)
        if self._closed or channel is None or channel.transport is None:
            return _NoProducer()
        transport: Any = channel.transport
        if IPushProducer.providedBy(transport):
            producer: IPushProducer = transport
            return producer
        return _NoProducer()


@implementer(IPushProducer)
class _NoProducer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class RegistryRequest(Request):
    """
    A request rendered as soon as its headers are in when it may carry a
    body (see the module's docstring).  L{body} is its L{StreamedBody}, or
    L{None} for a GET or HEAD, whose (unexpected) body Twisted keeps.
    """

    body: StreamedBody | None = None
    # An early answer held until the body is in: what was written, and
    # whether the resource has finished it.
    _held: list[bytes] | None = None
    _held_finish = False

    def gotLength(self, length: int | None) -> None:
        line = getattr(self.channel, "request_line", None)
        if line is None or line[0].upper() in _BODILESS:
            super().gotLength(length)
            return
        small = length is not None and length <= SMALL_BODY_LIMIT
        if not line[1].startswith(b"/v2/") and small:
            super().gotLength(length)
            return
        command, path, version = line
        self.content = io.BytesIO()
        self.body = StreamedBody(self, length)
        # Held "queued" so that an early answer's finish does not hand the
        # connection on before the body has been read (http.Request.finish).
        self.queued = True
        self.method, self.uri, self.clientproto = command, path, version
        self.path, _, query = path.partition(b"?")
        self.args = parse_qs(query, keep_blank_values=True) if query else {}
        self.process()

    @property
    def body_too_large(self) -> bool:
        """
        Whether this is a request outside C{/v2/} whose body is streamed,
        being larger than L{SMALL_BODY_LIMIT} or of unknown length: no such
        request takes one.
        """
        return self.body is not None and not self.path.startswith(b"/v2/")

    def handleContentChunk(self, data: bytes) -> None:
        if self.body is None:
            super().handleContentChunk(data)
        else:
            self.body.feed(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body is None:
            super().requestReceived(command, path, version)
            return
        self.body.end()
        self.queued = False
        if self._held is not None:
            self._release()
        elif self.finished and self.channel is not None:
            self._cleanup()

    def _may_hold(self, body: StreamedBody) -> bool:
        """Whether an early answer should wait for the rest of C{body}."""
        if body.length is None or body.length - body.received > HOLD_LIMIT:
            return False
        # The client sends no body before our "100 Continue", which an
        # early answer replaces (RegistryChannel._send100Continue).
        return not self.requestHeaders.hasHeader(b"Expect")

    def _release(self) -> None:
        """The body is in: send the held answer, on a connection that stays open."""
        held, self._held = self._held or [], None
        if self._disconnected:
            return
        for data in held:
            super().write(data)
        if self._held_finish:
            super().finish()

    def write(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        body = self.body
        if body is not None and not body.ended and not self.startedWriting:
            if self._may_hold(body):
                self._held = [data]
                body.discard()
                return
            # Answered before the body arrived: the connection closes after
            # the answer, since the rest of the body will not be read.
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            if self.channel is not None:
                self.channel.persistent = False
        super().write(data)

    def finish(self) -> None:
        body = self.body
        if body is not None and not body.ended and not self.finished and not self._disconnected:
            if self._held is None and not self.startedWriting and self._may_hold(body):
                self.write(b"")
            if self._held is not None:
                self._held_finish = True
                return
            if not self.startedWriting:
                self.write(b"")
            super().finish()
            body.discard()
            return
        super().finish()
