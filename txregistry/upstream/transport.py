"""
How upstream requests are sent: through treq's L{HTTPClient}, on the
agent that L{txregistry.upstream.endpoints} builds, with bodies left
unbuffered so that blobs stream with flow control.

Two of treq's defaults do not suit a registry client, and are undone here:

 - treq asks for gzip and decodes it, but digests are over the exact bytes
   a registry stores, so L{RawBodies} asks for the identity encoding and
   hides any C{Content-Encoding} from treq's decoder (a blob served with
   C{Content-Encoding: gzip} is a gzipped layer that must stay as it is);
 - treq keeps cookies, but nothing a registry says should depend on a
   cookie from an earlier answer, so its jar accepts none.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import Deferred
from twisted.python.components import proxyForInterface
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer


class _RawResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A response whose C{Content-Encoding} treq's decoder cannot see."""

    def __init__(self, original: IResponse) -> None:
        super().__init__(original)
        headers = Headers()
        for name, values in original.headers.getAllRawHeaders():
            if name.lower() == b"content-encoding":
                name = b"X-Upstream-Content-Encoding"
            headers.setRawHeaders(name, values)
        self.headers = headers


@implementer(IAgent)
class RawBodies:
    """Sends requests for the identity encoding, and returns bodies as they came."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        headers = headers.copy() if headers is not None else Headers()
        headers.setRawHeaders(b"Accept-Encoding", [b"identity"])
        response: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        return response.addCallback(_RawResponse)


def registry_http_client(agent: IAgent) -> HTTPClient:
    """A treq client for registry requests over C{agent}: raw bodies, no cookies."""
    no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(RawBodies(agent), cookiejar=no_cookies)
