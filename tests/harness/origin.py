"""
An in-memory origin registry that accepts pushes, with the faults of the
field: a body limit (as nginx's C{client_max_body_size} or a CDN's), cut
connections, a C{Location} turned to http, and storage that loses blobs.

It follows distribution's upload handler where the spec leaves room:
C{Range: 0-<last>} without C{bytes=}, C{0-0} for an empty upload, 416 for
a chunk that does not start where the upload ends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from harness.memory import FaultyAgent

HOST = "origin.test"
URL = f"https://{HOST}"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body_length: int
    status: int = 0


@dataclass
class FakeOrigin(Resource):
    """
    @ivar body_limit: requests with a longer body get 413, as nginx answers.
    @ivar cuts: for each of the next PATCHes, how many of its bytes reach the
        upload before the connection is cut (None: not cut).
    @ivar min_chunk: sent as C{OCI-Chunk-Min-Length}.
    @ivar location: C{"relative"}, C{"absolute"}, or C{"http"}: absolute,
        with the scheme a TLS terminator without X-Forwarded-Proto gives.
    @ivar lose_blobs: a replica without shared storage answers manifests.
    @ivar lose_uploads_on_cut: the upload is gone after a cut (distribution
        cancels an upload whose size no longer matches its state).
    @ivar basic: C{user:password} that Basic auth must give.
    @ivar bearer: C{user:password} that the token service must be given; it
        issues push tokens only for scopes with C{push}.
    """

    isLeaf = True
    body_limit: int | None = None
    cuts: list[int | None] = field(default_factory=list)
    min_chunk: int | None = None
    location: str = "relative"
    lose_blobs: bool = False
    lose_uploads_on_cut: bool = False
    basic: str | None = None
    bearer: str | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def requests(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    def render(self, request: Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        headers = {
            k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        path = request.uri.decode()
        seen = Seen(request.method.decode(), path, headers, len(body))
        self.seen.append(seen)
        result = self._answer(request, urlsplit(path), body, headers)
        seen.status = request.code
        return result

    def _answer(
        self, request: Request, url: Any, body: bytes, headers: dict[str, str]
    ) -> bytes | int:
        if url.path == "/token":
            return self._token(request, url)
        if not self._authorized(headers):
            challenge = (
                f'Bearer realm="{URL}/token",service="{HOST}"'
                if self.bearer
                else 'Basic realm="origin"'
            )
            request.setHeader(b"WWW-Authenticate", challenge.encode())
            return _error(request, 401, "UNAUTHORIZED", "authentication required")
        if self.body_limit is not None and len(body) > self.body_limit:
            request.setResponseCode(413)
            request.setHeader(b"Content-Type", b"text/html")
            return b"<html><head><title>413 Request Entity Too Large</title></head></html>"
        parts = url.path.removeprefix("/v2/").split("/")
        method = request.method
        if "uploads" in parts:
            i = parts.index("uploads")
            repository = "/".join(parts[: i - 1])
            upload = parts[i + 1] if len(parts) > i + 1 and parts[i + 1] else None
            return self._upload(request, method, repository, upload, url, body, headers)
        if "blobs" in parts:
            digest = parts[-1]
            if method == b"HEAD":
                if digest not in self.blobs:
                    return _error(request, 404, "BLOB_UNKNOWN", "blob unknown")
                request.setHeader(b"Content-Length", str(len(self.blobs[digest])).encode())
                return b""
            if method == b"DELETE":
                request.setResponseCode(202 if self.blobs.pop(digest, None) else 404)
                return b""
        if "manifests" in parts:
            i = parts.index("manifests")
            repository, reference = "/".join(parts[:i]), parts[i + 1]
            if method == b"PUT":
                return self._put_manifest(request, repository, reference, body)
            if method == b"DELETE":
                request.setResponseCode(202)
                return b""
        return _error(request, 404, "NAME_UNKNOWN", "no such thing")

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization")
        if self.basic:
            return given == "Basic " + base64.b64encode(self.basic.encode()).decode()
        if self.bearer:
            return given == "Bearer push-token"
        return True

    def _token(self, request: Request, url: Any) -> bytes:
        query = parse_qs(url.query)
        scope = " ".join(query.get("scope", []))
        self.scopes.append(scope)
        expected = "Basic " + base64.b64encode((self.bearer or "").encode()).decode()
        if request.getHeader(b"authorization") != expected.encode():
            return _error(request, 401, "UNAUTHORIZED", "bad credentials")
        token = "push-token" if "push" in scope else "pull-token"
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"token": token, "expires_in": 300}).encode()

    def _location(self, repository: str, upload: str) -> bytes:
        path = f"/v2/{repository}/blobs/uploads/{upload}?_state=s{len(self.uploads[upload])}"
        if self.location == "absolute":
            return f"{URL}{path}".encode()
        if self.location == "http":
            return f"http://{HOST}{path}".encode()
        return path.encode()

    def _upload(
        self,
        request: Request,
        method: bytes,
        repository: str,
        upload: str | None,
        url: Any,
        body: bytes,
        headers: dict[str, str],
    ) -> bytes | int:
        if upload is None and method == b"POST":
            upload = uuid.uuid4().hex
            self.uploads[upload] = bytearray()
            request.setResponseCode(202)
            request.setHeader(b"Location", self._location(repository, upload))
            request.setHeader(b"Range", b"0-0")
            if self.min_chunk is not None:
                request.setHeader(b"OCI-Chunk-Min-Length", str(self.min_chunk).encode())
            return b""
        if upload not in self.uploads:
            return _error(request, 404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry")
        data = self.uploads[upload]
        if method == b"PATCH":
            start = int(headers.get("content-range", "0-0").split("-")[0])
            if start != len(data):
                request.setResponseCode(416)
                return b""
            cut = self.cuts.pop(0) if self.cuts else None
            if cut is not None:
                data.extend(body[:cut])
                if self.lose_uploads_on_cut:
                    del self.uploads[upload]
                request.channel.transport.abortConnection()
                return b""
            data.extend(body)
            request.setResponseCode(202)
            request.setHeader(b"Location", self._location(repository, upload))
            request.setHeader(b"Range", f"0-{max(len(data) - 1, 0)}".encode())
            return b""
        if method == b"GET":
            request.setResponseCode(204)
            request.setHeader(b"Location", self._location(repository, upload))
            request.setHeader(b"Range", f"0-{max(len(data) - 1, 0)}".encode())
            return b""
        if method == b"PUT":
            data.extend(body)
            digest = parse_qs(url.query).get("digest", [""])[0]
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if digest != actual:
                return _error(request, 400, "DIGEST_INVALID", f"{digest} != {actual}")
            self.blobs[digest] = bytes(data)
            del self.uploads[upload]
            request.setResponseCode(201)
            request.setHeader(b"Docker-Content-Digest", digest.encode())
            request.setHeader(b"Location", f"/v2/{repository}/blobs/{digest}".encode())
            return b""
        if method == b"DELETE":
            del self.uploads[upload]
            request.setResponseCode(204)
            return b""
        return _error(request, 405, "UNSUPPORTED", "no")

    def _put_manifest(
        self, request: Request, repository: str, reference: str, body: bytes
    ) -> bytes:
        document = json.loads(body)
        named = [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]
        for digest in named:
            if self.lose_blobs or digest not in self.blobs:
                return _error(request, 400, "MANIFEST_BLOB_UNKNOWN", f"blob unknown: {digest}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[reference] = body
        self.manifests[digest] = body
        request.setResponseCode(201)
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        return b""


def _error(request: Request, status: int, code: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    if request.method == b"HEAD":
        return b""
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


class OriginNetwork:
    """A L{FakeOrigin} behind treq's traversal agent, recorded by a L{FaultyAgent}."""

    def __init__(self, origin: FakeOrigin) -> None:
        self.origin = origin
        self.clock = Clock()
        self.traversal = RequestTraversalAgent(origin)
        self.agent = FaultyAgent(self.traversal)

    def pump(self) -> None:
        for _ in range(1000):
            if not self.traversal._pumps:
                return
            self.traversal.flush()
