"""
The HTTP face of txregistry: the OCI distribution pull API and C{/health}.

One leaf resource parses every request (repository names contain slashes,
so Twisted's child-by-segment lookup does not fit), asks the
L{PullThroughCache} for an answer, and writes it.  Every failure becomes the
OCI error JSON; no traceback ever reaches a client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from txregistry.http.routing import Kind, Route, Router, push_unsupported
from txregistry.http.senders import (
    ByteSource,
    CompleteFile,
    FileSender,
    abort_connection,
)
from txregistry.oci.errors import RegistryError
from txregistry.ops.metrics import CONTENT_TYPE
from txregistry.repository.fill import StreamThrough
from txregistry.repository.pullthrough import (
    BlobAnswer,
    BlobFilling,
    BlobHead,
    BlobHit,
    BlobStream,
    ManifestAnswer,
    PullThroughCache,
)
from txregistry.sockets import send_in_large_pieces

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_READ_METHODS = (b"GET", b"HEAD")
# Query parameters passed on to the upstream for tags/list and referrers.
_PASSED_PARAMS = {Kind.TAGS: ("n", "last"), Kind.REFERRERS: ("artifactType",)}


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """
    The byte range C{[start, end)} a single-range C{Range} header asks for,
    or L{None} to send the whole blob (no header, several ranges, or one we
    cannot parse, which RFC 9110 section 14.2 lets a server ignore).

    @raise RegistryError: 416, if the range starts past the end.
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.decode("latin-1").strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            raise RegistryError.range_not_satisfiable(size)
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RegistryError.range_not_satisfiable(size)
    end = size if not last else min(int(last) + 1, size)
    return start, end


@dataclass(frozen=True)
class Finished:
    """What became of one request, for the access log and metrics."""

    client: str
    method: str
    path: str
    kind: str
    status: int
    cache: str
    sent: int
    duration: float
    aborted: bool


class _Exchange:
    """One request, whether its client is still there, and how it ended."""

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        finished: Callable[[Finished], None] | None,
    ) -> None:
        self.request = request
        self.gone = False
        self.kind = "other"
        self._clock = clock
        self._started = clock.seconds()
        self._finished = finished
        request.notifyFinish().addCallbacks(self._done, self._lost)

    def _lost(self, _: Failure) -> None:
        self.gone = True
        self._done(None, aborted=True)

    def _done(self, _: object, aborted: bool = False) -> None:
        if self._finished is None:
            return
        request = self.request
        client = request.getClientAddress()
        self._finished(
            Finished(
                client=str(getattr(client, "host", client)),
                method=request.method.decode("ascii", "replace"),
                path=request.uri.decode("ascii", "replace")[:1000],
                kind=self.kind,
                status=request.code,
                cache=(request.responseHeaders.getRawHeaders(b"x-cache") or [b""])[0].decode(),
                sent=request.sentLength,
                duration=self._clock.seconds() - self._started,
                aborted=aborted,
            )
        )

    @property
    def head(self) -> bool:
        return self.request.method == b"HEAD"

    def set(self, name: str, value: str | int) -> None:
        self.request.responseHeaders.setRawHeaders(name, [str(value).encode("latin-1")])

    def finish(self, body: bytes = b"") -> None:
        if self.gone:
            return
        if body:
            self.request.write(body)
        self.request.finish()


class RegistryResource(Resource):
    """
    The whole HTTP API: C{/v2/...}, C{/health} and C{/metrics}.

    @param finished: told how each request ended, for the access log and
        metrics.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        router: Router,
        cache: PullThroughCache,
        health: Callable[[], tuple[int, dict[str, Any]]],
        metrics: Callable[[], bytes] | None = None,
        finished: Callable[[Finished], None] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__()
        self._router = router
        self._cache = cache
        self._health = health
        self._metrics = metrics
        self._finished = finished
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self._clock: IReactorTime = clock

    def render(self, request: Request) -> bytes | int:
        exchange = _Exchange(request, self._clock, self._finished)
        path = request.path
        if path == b"/health":
            exchange.kind = "health"
            code, document = self._health()
            request.setResponseCode(code)
            return _json(request, document)
        if path == b"/metrics" and self._metrics is not None:
            exchange.kind = "metrics"
            request.responseHeaders.setRawHeaders(b"Content-Type", [CONTENT_TYPE.encode()])
            return self._metrics()
        request.responseHeaders.setRawHeaders(b"Docker-Distribution-API-Version", [b"registry/2.0"])
        if request.method not in _READ_METHODS:
            if path.startswith(b"/v2/"):
                return _error_now(request, push_unsupported())
            return _error_now(request, RegistryError.unsupported("only GET and HEAD are served"))
        if path in (b"/v2", b"/v2/"):
            exchange.kind = "base"
            return _json(request, {})
        try:
            ns = request.args.get(b"ns", [None])[0] if request.args else None
            route = self._router.route(path, ns)
        except RegistryError as e:
            return _error_now(request, e)
        exchange.kind = route.kind.value.rstrip("s")
        Deferred.fromCoroutine(self._serve(exchange, route)).addErrback(self._unexpected, exchange)
        return NOT_DONE_YET

    async def _serve(self, exchange: _Exchange, route: Route) -> None:
        try:
            if route.kind is Kind.MANIFEST:
                accept = b", ".join(exchange.request.requestHeaders.getRawHeaders(b"accept", []))
                answer = await self._cache.manifest(route, exchange.head, accept)
                self._send_manifest(exchange, answer)
            elif route.kind is Kind.BLOB:
                self._send_blob(exchange, route, await self._cache.blob(route, exchange.head))
            else:
                await self._pass_through(exchange, route)
        except RegistryError as e:
            _send_error(exchange, e)

    def _send_manifest(self, exchange: _Exchange, answer: ManifestAnswer) -> None:
        exchange.set("Content-Type", answer.media_type)
        exchange.set("Content-Length", answer.size)
        exchange.set("Docker-Content-Digest", answer.digest)
        exchange.set("ETag", f'"{answer.digest}"')
        exchange.set("X-Cache", answer.cache)
        exchange.finish(answer.body or b"")

    def _send_blob(self, exchange: _Exchange, route: Route, answer: BlobAnswer) -> None:
        request = exchange.request
        exchange.set("Content-Type", "application/octet-stream")
        exchange.set("Docker-Content-Digest", str(route.digest))
        exchange.set("X-Cache", answer.cache)
        if isinstance(answer, BlobHit):
            blob = answer.blob
            _send_file(exchange, CompleteFile(blob.file, blob.size), blob.size)
        elif isinstance(answer, BlobFilling):
            # A range inside the bytes already received is sent at once; any
            # other waits for the bytes it needs.
            _send_file(exchange, answer.fill, answer.fill.expected_size)
        elif isinstance(answer, BlobStream):
            length = answer.response.content_length
            if length is not None:
                exchange.set("Content-Length", length)
            stream = StreamThrough(request, answer.digest, length, self._cache.count_fetched)
            if exchange.gone:
                stream.stopProducing()
            answer.response.response.deliverBody(stream)
        else:
            assert isinstance(answer, BlobHead)
            if answer.size is not None:
                exchange.set("Content-Length", answer.size)
            exchange.finish()

    async def _pass_through(self, exchange: _Exchange, route: Route) -> None:
        path = (
            f"{route.kind.value}/list" if route.kind is Kind.TAGS else f"referrers/{route.digest}"
        )
        args = exchange.request.args or {}
        query = [
            (name, value.decode("utf-8", "replace"))
            for name in _PASSED_PARAMS[route.kind]
            for value in args.get(name.encode("ascii"), [])
        ]
        if query:
            path += "?" + urlencode(query)
        answer = await self._cache.passthrough(route, path)
        for name, value in answer.headers.items():
            if name == "Link" and route.prefix and value.startswith("</v2/"):
                # Keep the client on the path-prefixed route it used.
                value = f"</v2/{route.prefix}/" + value[len("</v2/") :]
            exchange.set(name, value)
        exchange.request.setResponseCode(answer.code)
        exchange.set("Content-Length", len(answer.body))
        exchange.finish(answer.body)

    def _unexpected(self, failure: Failure, exchange: _Exchange) -> None:
        self.log.failure(
            "Unexpected error serving {method} {path}",
            failure,
            method=exchange.request.method.decode("ascii", "replace"),
            path=exchange.request.path.decode("ascii", "replace")[:300],
        )
        _send_error(
            exchange,
            RegistryError(500, "UNKNOWN", "internal error in txregistry; its log has the details"),
        )


class RegistryChannel(HTTPChannel):
    """
    An HTTP connection that turns away a TLS handshake at once, and gives a
    client C{header_timeout} seconds from a request's first byte to finish
    its headers.

    Clients told that a registry is "insecure" (docker, containerd, podman,
    skopeo) try HTTPS first and fall back to HTTP.  A plain HTTP parser would
    wait for a line end that a TLS ClientHello never sends, and each client
    would stall until its handshake timeout (10 seconds in Go).  Closing the
    connection makes them fall back immediately.

    Twisted's own idle timeout restarts with every byte, so a client that
    trickles its headers a byte at a time (slowloris) would hold a
    connection for ever without the header deadline.
    """

    _TLS_HANDSHAKE_RECORD = 0x16  # RFC 8446 section 5.1; no HTTP method starts so

    log = Logger()
    header_timeout = 30.0
    _first_data = True
    _header_timer: IDelayedCall | None = None
    _in_request = False

    def connectionMade(self) -> None:
        super().connectionMade()
        send_in_large_pieces(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._first_data and data:
            self._first_data = False
            if data[0] == self._TLS_HANDSHAKE_RECORD:
                assert self.transport is not None
                cast(ITCPTransport, self.transport).abortConnection()
                return
        if self._header_timer is None and not self._in_request and data:
            self._header_timer = self.callLater(self.header_timeout, self._headers_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._stop_header_timer()
        self._in_request = True
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        self._in_request = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_header_timer()
        super().connectionLost(reason)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        assert self.transport is not None
        self.log.info(
            "client {peer} sent no complete request headers within {timeout}s; disconnecting",
            peer=str(self.transport.getPeer()),
            timeout=self.header_timeout,
        )
        self._refuse(b"408 Request Timeout")

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted would just close the connection: say why first.
        self._refuse(b"431 Request Header Fields Too Large")

    def _refuse(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        self.transport.loseConnection()


class RegistrySite(Site):
    """
    The HTTP server for L{RegistryResource}, whose requests are logged by the
    resource (see L{Finished}) rather than by Twisted's combined log.
    """

    # A plain HTTPChannel, which is what Twisted's HTTPFactory used before it
    # grew HTTP/2 switching; txregistry speaks HTTP/1.1 only.
    protocol = RegistryChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        header_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        reactor: Any = None,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.header_timeout = self.header_timeout
        return channel

    def log(self, request: http.Request) -> None:
        pass


def _send_file(exchange: _Exchange, source: ByteSource, size: int | None) -> None:
    """
    Send a file (cached, or still downloading), or the range of it the
    client asked for.  Takes over the caller's reference to C{source}.
    """
    start, end = 0, size
    if size is not None:
        exchange.set("Accept-Ranges", "bytes")
        try:
            byte_range = parse_range(exchange.request.getHeader(b"range"), size)
        except RegistryError as e:
            source.release()
            _send_error(exchange, e)
            return
        if byte_range is not None:
            start, end = byte_range
            exchange.request.setResponseCode(206)
            exchange.set("Content-Range", f"bytes {start}-{end - 1}/{size}")
        exchange.set("Content-Length", (end or 0) - start)
    if exchange.head or exchange.gone:
        source.release()
        exchange.finish()
        return
    FileSender(source, exchange.request, start, end).begin()


def _json(request: Request, document: Any) -> bytes:
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    return json.dumps(document).encode("utf-8")


def _error_now(request: Request, error: RegistryError) -> bytes:
    request.setResponseCode(error.status)
    for name, value in error.headers.items():
        request.responseHeaders.setRawHeaders(name, [value.encode("latin-1")])
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    return error.body()


def _send_error(exchange: _Exchange, error: RegistryError) -> None:
    request = exchange.request
    if exchange.gone:
        return
    if request.startedWriting:
        # Too late for a status: cut the response short instead.
        abort_connection(request)
        return
    body = _error_now(request, error)
    request.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode("ascii")])
    exchange.finish(body)
