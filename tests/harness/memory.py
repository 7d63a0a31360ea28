"""
txregistry wired to a fake upstream, entirely in memory.

The client side is txregistry's real L{RegistrySite} on a L{StringTransport},
so a test sees exactly the bytes a client would, including an aborted
connection.  The upstream side is L{FakeRegistry}, an in-memory OCI registry
behind treq's L{RequestTraversalAgent}.  Time is a L{Clock}.  Store calls
run synchronously, against a real diskcache in a temporary directory.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from txregistry.config import (
    CacheConfig,
    FleetConfig,
    MirrorConfig,
    RegistryConfig,
    ServerConfig,
)
from txregistry.http.exchange import Finished
from txregistry.http.push_access import PushAccess
from txregistry.http.resource import RegistryResource
from txregistry.http.routing import Router
from txregistry.http.site import RegistrySite
from txregistry.http.uploads import PushAPI
from txregistry.oci.reference import Digest
from txregistry.ops.metrics import Metrics
from txregistry.repository.choose import ByRegistry
from txregistry.repository.hosted import HostedRepository
from txregistry.repository.pullthrough import PullThroughCache
from txregistry.repository.push import IPushTarget
from txregistry.repository.push_through import PushThroughRepository
from txregistry.repository.uploads import Uploads
from txregistry.storage.disk import DiskStorage
from txregistry.storage.runner import run_inline
from txregistry.storage.staging import InlineSpool, SpoolFactory
from txregistry.upstream.client import Upstream
from txregistry.upstream.peers import Fleet
from txregistry.upstream.push import OriginPusher

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


@dataclass
class Seen:
    """A request the fake upstream received."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeRegistry(Resource):
    """
    An in-memory OCI registry: enough of the pull API, with distribution's
    handling of C{Accept}, Bearer token auth when C{require_token} is set,
    and hooks to inject faults.
    """

    isLeaf = True

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    # The digest each tag names.
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    # For a tag that names a Docker manifest list: the manifest distribution
    # answers a client that does not accept lists with.
    list_rewrites: dict[tuple[str, str], str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    require_token: bool = False
    token_lifetime: int = 300
    realm: str = "http://auth.fake/token"
    # USER:PASSWORD its token service requires as Basic auth, if any.
    token_credentials: str | None = None
    # USER:PASSWORD the registry itself requires as Basic auth, if any.
    require_basic: str | None = None
    # Whether "Range: bytes=N-" on a blob gets a 206, or is ignored.
    honor_range: bool = True
    tokens_issued: list[str] = field(default_factory=list)
    # Called first with each request; a non-None result is the response body,
    # or NOT_DONE_YET for a response the test writes itself.
    hooks: list[Callable[[Request], bytes | int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        Resource.__init__(self)

    # Filling it.

    def add_blob(self, data: bytes) -> str:
        digest = str(Digest.of(data))
        self.blobs[digest] = data
        return digest

    def add_manifest(
        self, repository: str, tag: str | None, body: bytes, media_type: str = OCI_MANIFEST
    ) -> str:
        digest = str(Digest.of(body))
        self.manifests[digest] = (media_type, body)
        if tag is not None:
            self.tags[(repository, tag)] = digest
        return digest

    def requests(self, method: str | None = None, contains: str = "") -> list[Seen]:
        return [
            s for s in self.seen if (method is None or s.method == method) and contains in s.path
        ]

    # Serving.

    def hold_blob(self, digest: str) -> list[Request]:
        """
        Make GETs of a blob send only their headers: the test writes the
        body, in whatever pieces it likes, to the requests returned.  A GET
        with a Range gets a 206 for the bytes it asks for.
        """
        held: list[Request] = []

        def hold(request: Request) -> int | None:
            if request.method == b"GET" and request.path.endswith(f"/blobs/{digest}".encode()):
                size = len(self.blobs[digest])
                span = _range(request, size) if self.honor_range else None
                start, end = span or (0, size)
                if span is not None:
                    request.setResponseCode(206)
                    request.setHeader(b"Content-Range", f"bytes {start}-{end - 1}/{size}".encode())
                request.setHeader(b"Content-Length", str(end - start).encode())
                request.write(b"")
                held.append(request)
                return NOT_DONE_YET
            return None

        self.hooks.append(hold)
        return held

    def render(self, request: Request) -> bytes | int:
        path = request.uri.decode()
        headers = {
            k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.seen.append(Seen(request.method.decode(), path, headers))
        for hook in self.hooks:
            result = hook(request)
            if result is not None:
                return result
        if request.path == b"/token":
            if self.token_credentials is not None and not _has_basic(
                request, self.token_credentials
            ):
                return _json(
                    request, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad login"}]}
                )
            token = f"token-{len(self.tokens_issued)}"
            self.tokens_issued.append(token)
            return _json(request, 200, {"token": token, "expires_in": self.token_lifetime})
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", request.path.decode())
        if match is None:
            tags = re.fullmatch(r"/v2/(.+)/tags/list", request.path.decode())
            if tags is not None:
                names = sorted(t for (r, t) in self.tags if r == tags[1])
                return _json(request, 200, {"name": tags[1], "tags": names})
            return _json(request, 404, {"errors": [{"code": "NOT_FOUND", "message": "no"}]})
        name, kind, ref = match.groups()
        if self.require_basic is not None and not _has_basic(request, self.require_basic):
            request.setHeader(b"WWW-Authenticate", b'Basic realm="fake registry"')
            return _json(request, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "login"}]})
        if self.require_token and not self._authorized(request):
            challenge = f'Bearer realm="{self.realm}",service="fake",scope="repository:{name}:pull"'
            request.setHeader(b"WWW-Authenticate", challenge.encode())
            return _json(
                request,
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            )
        if kind == "blobs":
            blob = self.blobs.get(ref)
            if blob is None:
                return _json(
                    request,
                    404,
                    {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]},
                )
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Docker-Content-Digest", ref.encode())
            span = _range(request, len(blob)) if self.honor_range else None
            if span is not None:
                start, end = span
                request.setResponseCode(206)
                request.setHeader(b"Content-Range", f"bytes {start}-{end - 1}/{len(blob)}".encode())
                return blob[start:end]
            return blob
        digest = ref if ":" in ref else self.tags.get((name, ref))
        if digest is None or digest not in self.manifests:
            return _manifest_unknown(request, "manifest unknown")
        media_type, body = self.manifests[digest]
        # What distribution's GetManifest does with the Accept header
        # (registry/handlers/manifests.go, v2.8.2 and v3): only exact types
        # count, "*/*" does not.
        accepted = {
            part.split(";")[0].strip()
            for line in request.requestHeaders.getRawHeaders(b"accept", [])
            for part in line.decode().split(",")
        }
        if media_type == OCI_MANIFEST and OCI_MANIFEST not in accepted:
            return _manifest_unknown(
                request, "OCI manifest found, but accept header does not support OCI manifests"
            )
        if media_type == OCI_INDEX and OCI_INDEX not in accepted:
            return _manifest_unknown(
                request, "OCI index found, but accept header does not support OCI indexes"
            )
        if ":" not in ref and media_type == DOCKER_LIST and DOCKER_LIST not in accepted:
            # The manifest of linux/amd64, for a client that takes no list.
            digest = self.list_rewrites.get((name, ref))
            if digest is None:
                return _manifest_unknown(request, "manifest unknown")
            media_type, body = self.manifests[digest]
        request.setHeader(b"Content-Type", media_type.encode())
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        return body

    def _authorized(self, request: Request) -> bool:
        auth = (request.getHeader(b"authorization") or b"").decode()
        return auth.startswith("Bearer ") and auth[len("Bearer ") :] in self.tokens_issued


class FakeNetwork(Resource):
    """Several fake hosts: each request goes to the resource for its Host header."""

    isLeaf = True

    def __init__(self, hosts: dict[str, Resource], default: Resource | None = None) -> None:
        super().__init__()
        self.hosts = hosts
        self.default = default

    def render(self, request: Request) -> bytes | int:
        host = (request.getHeader(b"host") or b"").decode().split(":")[0]
        resource = self.hosts.get(host, self.default)
        if resource is None:
            return _json(
                request, 421, {"errors": [{"code": "UNKNOWN", "message": f"no host {host}"}]}
            )
        return resource.render(request)


@dataclass
class Sent:
    method: str
    url: str
    headers: dict[str, str]


@implementer(IAgent)
class FaultyAgent:
    """
    Wraps an agent: requests to hosts in C{refused} fail as a refused
    connection would, those to hosts in C{stalled} never get an answer,
    and every request is recorded.
    """

    def __init__(self, agent: IAgent) -> None:
        self.agent = agent
        self.refused: set[str] = set()
        self.stalled: set[str] = set()
        self.sent: list[Sent] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        host = URI.fromBytes(uri).host.decode()
        recorded = {
            k.decode().lower(): v[-1].decode() for k, v in (headers or Headers()).getAllRawHeaders()
        }
        self.sent.append(Sent(method.decode(), uri.decode(), recorded))
        if host in self.refused:
            return fail(ConnectionRefusedError())
        if host in self.stalled:
            return Deferred()
        return self.agent.request(method, uri, headers, bodyProducer)

    def to(self, host: str) -> list[Sent]:
        return [s for s in self.sent if URI.fromBytes(s.url.encode()).host.decode() == host]


def _range(request: Request, size: int) -> tuple[int, int] | None:
    """The span C{(start, end)} a C{Range: bytes=N-} or C{bytes=N-M} asks for, if any."""
    match = re.fullmatch(rb"bytes=(\d+)-(\d*)", request.getHeader(b"range") or b"")
    if match is None:
        return None
    return int(match[1]), min(size, int(match[2]) + 1) if match[2] else size


def _has_basic(request: Request, user_password: str) -> bool:
    expected = b"Basic " + base64.b64encode(user_password.encode())
    return request.getHeader(b"authorization") == expected


def _manifest_unknown(request: Request, message: str) -> bytes:
    return _json(request, 404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": message}]})


def _json(request: Request, code: int, document: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(document).encode()


@dataclass
class Response:
    """What a client received, parsed from the raw bytes."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool
    aborted: bool
    # The status line's reason phrase: all some clients print of an error.
    reason: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes, head: bool = False) -> tuple[int, dict[str, str], bytes, bool]:
    """Parse one HTTP/1.1 response; return status, headers, body and completeness."""
    header_end = raw.index(b"\r\n\r\n")
    lines = raw[:header_end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    rest = raw[header_end + 4 :]
    if head or status in (204, 304):
        return status, headers, b"", True
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_end = rest.find(b"\r\n")
            if size_end < 0:
                return status, headers, body, False
            size = int(rest[:size_end], 16)
            if size == 0:
                return status, headers, body, True
            chunk = rest[size_end + 2 : size_end + 2 + size]
            body += chunk
            if len(chunk) < size:
                return status, headers, body, False
            rest = rest[size_end + 2 + size + 2 :]
    length = int(headers.get("content-length", "0"))
    return status, headers, rest[:length], len(rest) >= length


class BufferedTransport(StringTransport):
    """
    A client connection with a send buffer: like a TCP transport, it pauses
    its producer once more than C{limit} bytes wait to be sent, and resumes
    it when the test L{drain}s them, as a slow client would.

    @ivar peak: the most bytes ever waiting, which is what a slow client
        costs txregistry in memory.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.limit = limit
        self.delivered = b""
        self.peak = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        waiting = len(self.io.getvalue())
        self.peak = max(self.peak, waiting)
        if waiting > self.limit and self.producer is not None and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The client reads everything that waits."""
        self.delivered += self.value()
        self.clear()
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()


class Client:
    """One client connection to txregistry, over a L{StringTransport}."""

    def __init__(
        self, site: RegistrySite, pump: Callable[[], None], transport: StringTransport | None = None
    ) -> None:
        self.transport = transport or StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
        )
        self.channel = site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)
        self._pump = pump
        self._head = False

    def send(
        self, method: str, path: str, headers: dict[str, str | list[str]] | None = None
    ) -> None:
        """Send a request; a list of values is sent as one header line each."""
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost:5050"]
        for name, values in (headers or {}).items():
            lines += [f"{name}: {v}" for v in ([values] if isinstance(values, str) else values)]
        self._head = method == "HEAD"
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._pump()

    def send_body(self, data: bytes) -> None:
        """More of the request's body, as it arrives from the network."""
        self.channel.dataReceived(data)
        self._pump()

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str | list[str]] | None = None,
    ) -> Response:
        """One request with a body of known length, and its response."""
        self.clear()
        self.send(method, path, {"Content-Length": str(len(body)), **(headers or {})})
        if body:
            self.send_body(body)
        return self.response()

    def clear(self) -> None:
        if hasattr(self.transport, "delivered"):
            self.transport.delivered = b""
        self.transport.clear()

    def response(self) -> Response:
        raw = getattr(self.transport, "delivered", b"") + self.transport.value()
        status, headers, body, complete = parse_response(raw, self._head)
        status_line = raw.split(b"\r\n", 1)[0].decode("latin-1")
        reason = status_line.split(" ", 2)[2] if status_line.count(" ") >= 2 else ""
        return Response(status, headers, body, complete, bool(self.transport.disconnected), reason)

    def disconnect(self) -> None:
        """The client goes away, as a real TCP transport reports it."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.transport.disconnected = True
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
        self.channel.connectionLost(Failure(ConnectionLost()))
        self._pump()


class MemoryRegistry:
    """txregistry in front of a L{FakeRegistry}, all in memory."""

    def __init__(
        self,
        tmp_path: Path,
        upstream: FakeRegistry | None = None,
        registries: list[RegistryConfig] | None = None,
        tag_ttl: float = 300.0,
        size_limit: int = 1 << 30,
        hosts: dict[str, Resource] | None = None,
        spool: SpoolFactory = InlineSpool,
        fleet: FleetConfig | None = None,
        server: ServerConfig | None = None,
        **cache: Any,
    ) -> None:
        """
        @param upstream: answers for every host not in C{hosts}.
        @param hosts: fake registries (or other resources) by host name.
        @param spool: how downloads are written and hashed; at once, by
            default, since nothing here runs threads' callbacks.
        """
        self.upstream = upstream or FakeRegistry()
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.network = FakeNetwork(hosts or {}, self.upstream)
        self._traversal = RequestTraversalAgent(self.network)
        self.agent = FaultyAgent(self._traversal)
        self.registries = registries or [
            RegistryConfig(
                "docker.io", (MirrorConfig("https://registry-1.docker.io"),), default=True
            )
        ]
        self.storage = DiskStorage(
            tmp_path / "cache", size_limit, run_inline, spools=spool, now=self.clock.seconds
        )
        self.storage.start()
        self.cache_config = CacheConfig(tmp_path / "cache", size_limit, tag_ttl, **cache)
        self.fleet = Fleet(fleet, self.clock) if fleet is not None else None
        self.upstreams = {
            r.name: Upstream(r, self.agent, self.clock, self.fleet, self.agent)
            for r in self.registries
            if not r.hosted
        }
        self.cache = PullThroughCache(self.storage, self.upstreams, self.clock, self.cache_config)
        self.metrics = Metrics(self.cache, self.upstreams, self.storage, fleet=self.fleet)
        # How each request ended, as the access log would say.
        self.finished: list[Finished] = []

        def finished(request: Finished) -> None:
            self.finished.append(request)
            self.metrics.request_done(request.kind, request.status, request.cache, request.sent)

        # Pushes, wired as the service wires them.
        server = server or ServerConfig()
        self.hosted = HostedRepository(self.storage, self.clock)
        hosted = {r.name: self.hosted for r in self.registries if r.hosted}
        self.uploads = Uploads(self.storage, self.clock)
        self.access = PushAccess(server.push_from, server.push_users, run_inline, self.clock)
        resource = RegistryResource(
            Router(self.registries),
            ByRegistry(self.cache, hosted),
            self.clock,
            lambda: (200, {"status": "ok"}),
            self.metrics.render,
            finished,
            peers=fleet.peers if fleet is not None else (),
            push=PushAPI({**hosted, **self._push_through()}, self.uploads),
            access=self.access,
        )
        # The clock of client connections: header and idle timeouts.
        self.site_clock = MemoryReactorClock()
        self.site = RegistrySite(resource, header_timeout=30.0, reactor=self.site_clock)

    def _push_through(self) -> dict[str, IPushTarget]:
        """The push targets of C{push = true} registries, pushing through the fake network."""
        return {
            r.name: PushThroughRepository(
                self.storage, OriginPusher(r, self.agent, self.clock), self.clock
            )
            for r in self.registries
            if r.push
        }

    def pump(self) -> None:
        """Move bytes between txregistry and the fake upstream until nothing moves."""
        for _ in range(100):
            if not self._traversal._pumps:
                return
            self._traversal.flush()

    def client(self, transport: StringTransport | None = None) -> Client:
        return Client(self.site, self.pump, transport)

    def pull_held(self, blob: bytes) -> tuple[str, list[Request], Client]:
        """
        A client's GET of C{blob}, whose upstream response is held for the
        test to write (see L{FakeRegistry.hold_blob}): the digest, the held
        upstream requests and the client.
        """
        digest = self.upstream.add_blob(blob)
        held = self.upstream.hold_blob(digest)
        client = self.client()
        client.send("GET", f"/v2/alpine/blobs/{digest}")
        return digest, held, client

    def get(
        self, path: str, headers: dict[str, str | list[str]] | None = None, method: str = "GET"
    ) -> Response:
        client = self.client()
        client.send(method, path, headers)
        return client.response()

    def head(self, path: str, headers: dict[str, str | list[str]] | None = None) -> Response:
        return self.get(path, headers, method="HEAD")
