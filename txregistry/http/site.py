"""
The HTTP server: connections that turn away TLS at once and time out slow
headers, and a site whose requests are logged by the resource.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txregistry.http.bodies import RegistryRequest
from txregistry.sockets import send_in_large_pieces


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
    request_line: tuple[bytes, bytes, bytes] | None = None

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
        # For RegistryRequest.gotLength, which renders a request that may
        # carry a body before the body: Twisted keeps the request line on
        # the channel until the body is in.
        self.request_line = (self._command, self._path, self._version)
        super().allHeadersReceived()

    def _send100Continue(self) -> None:
        # A push may be answered from its headers alone (a refusal) before
        # Twisted would say "100 Continue": the answer is final, and a 100
        # after it would be read as the next response.
        if self.requests and self.requests[-1].startedWriting:
            return
        super()._send100Continue()

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
    # Twisted's "Starting factory" line repeats the listener's "listening on".
    noisy = False

    def __init__(
        self,
        resource: Resource,
        header_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        reactor: IReactorTime | None = None,
    ) -> None:
        super().__init__(
            resource, requestFactory=RegistryRequest, timeout=idle_timeout, reactor=reactor
        )
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.header_timeout = self.header_timeout
        return channel

    def log(self, request: http.Request) -> None:
        pass
