"""
The push API: blob uploads in every style real clients use, manifest
pushes with their checks, and deletes.  What is verified is handed to the
registry's L{IPushTarget}.

Upload styles (OCI distribution spec, "Pushing blobs"):

 - C{POST ?digest=} with the whole body: one request;
 - C{POST}, then C{PUT ?digest=} with the whole body (containerd, BuildKit,
   Docker 29 and later);
 - C{POST}, one C{PATCH} (streamed, chunked or with C{Content-Length}),
   then an empty C{PUT ?digest=} (Docker before 29, skopeo, podman,
   go-containerregistry);
 - C{POST}, several C{PATCH}es with C{Content-Range}, then C{PUT}; a chunk
   that does not start where the last ended gets 416;
 - C{GET} of the upload (204 with C{Range}), C{DELETE} of it;
 - C{POST ?mount=&from=}: 201 when the blob is there, else 202 and a new
   upload.

Every answer carries a relative C{Location} (a registry behind a TLS
terminator must not hand out an C{http://} one), C{Range} and
C{Docker-Upload-UUID}.  Bodies stream into the upload's staged blob as they
arrive (L{txregistry.http.bodies}), with reading from the client paused
while the disk is behind, so memory stays flat whatever the size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txregistry.http.bodies import StreamedBody
from txregistry.http.exchange import Exchange
from txregistry.oci.errors import RegistryError
from txregistry.oci.pushed import (
    MAX_MANIFEST_SIZE,
    manifest_blob_unknown,
    manifest_too_large,
    parse_pushed,
)
from txregistry.oci.reference import Digest, Tag
from txregistry.repository.interface import Kind, Route
from txregistry.repository.push import IPushTarget
from txregistry.repository.uploads import Upload, Uploads

# How far the body may run ahead of the disk before reading pauses.
_BEHIND_LIMIT = 8 << 20
_CONTENT_RANGE_RE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


def _upload_busy(upload: Upload) -> RegistryError:
    return RegistryError(
        416,
        "BLOB_UPLOAD_INVALID",
        f"upload {upload.id} is receiving another request's body: send one at a time",
        headers={"Range": _range(upload)},
    )


def _range(upload: Upload) -> str:
    # distribution answers "0-0" for an empty upload, which clients expect.
    return f"0-{max(upload.received - 1, 0)}"


class ClientGone(Exception):
    """
    The client's connection went before its request's body ended (a
    cancelled push): nobody is left to answer, and it is no error of ours.
    """


class _BodyDone:
    """Waits for a request body to end, or for its connection to go."""

    def __init__(self, exchange: Exchange) -> None:
        self.deferred: Deferred[None] = Deferred()
        exchange.request.notifyFinish().addErrback(self._lost)

    def _lost(self, failure: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(ClientGone(failure.getErrorMessage()))

    def body_end(self) -> None:
        if not self.deferred.called:
            self.deferred.callback(None)


class _UploadSink(_BodyDone):
    """Appends a body to an upload, pausing the client while the disk is behind."""

    def __init__(
        self,
        exchange: Exchange,
        uploads: Uploads,
        upload: Upload,
        body: StreamedBody,
        ends_at: int | None = None,
    ):
        """
        @param ends_at: where the upload must end with this body, from its
            C{Content-Range}: a chunked body that goes past it is refused
            before a byte beyond it is kept.
        """
        super().__init__(exchange)
        self._uploads = uploads
        self._upload = upload
        self._body = body
        self._ends_at = ends_at
        self._waiting = False

    def body_data(self, data: bytes) -> None:
        if self.deferred.called:
            return
        if self._ends_at is not None and self._upload.received + len(data) > self._ends_at:
            self.deferred.errback(
                RegistryError(
                    400,
                    "BLOB_UPLOAD_INVALID",
                    f"the chunk is longer than its Content-Range, which ends at byte"
                    f" {self._ends_at - 1}: upload {self._upload.id} kept its first"
                    f" {self._upload.received} bytes; send the rest from there",
                    headers={"Range": _range(self._upload)},
                )
            )
            return
        self._uploads.append(self._upload, data)
        if not self._waiting and self._behind() > _BEHIND_LIMIT:
            self._waiting = True
            self._body.pause()
            self._wait()

    def _behind(self) -> int:
        written: int = self._upload.staged.written
        return self._upload.received - written

    def _wait(self) -> None:
        staged = self._upload.staged
        staged.wake_on_progress(staged.written, self._progressed)

    def _progressed(self) -> None:
        if self._behind() > _BEHIND_LIMIT // 2 and self._upload.staged.failure is None:
            self._wait()
            return
        self._waiting = False
        self._body.resume()


class _Collect(_BodyDone):
    """Keeps a small body (a manifest) in memory, refusing one too large."""

    def __init__(self, exchange: Exchange, limit: int) -> None:
        super().__init__(exchange)
        self._limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def body_data(self, data: bytes) -> None:
        if self.deferred.called:
            return
        self.size += len(data)
        if self.size > self._limit:
            self.parts = []
            self.deferred.errback(manifest_too_large(None))
            return
        self.parts.append(data)


class PushAPI:
    """Answers the push requests of the registries that take them."""

    log = Logger()

    def __init__(self, targets: Mapping[str, IPushTarget], uploads: Uploads) -> None:
        self._targets = targets
        self.uploads = uploads

    def target(self, route: Route) -> IPushTarget | None:
        return self._targets.get(route.registry.name)

    async def serve(self, exchange: Exchange, route: Route, target: IPushTarget) -> None:
        """
        One push request, whose access was checked.

        @raise RegistryError: for any failure, to be sent as its answer.
        """
        method = exchange.request.method
        if route.kind is Kind.UPLOADS:
            if not route.upload:
                if method != b"POST":
                    raise RegistryError.unsupported("start an upload with POST", status=405)
                await self._post(exchange, route, target)
                return
            upload = self.uploads.find(route, route.upload)
            self.uploads.touch(upload)
            if method == b"PATCH":
                await self._patch(exchange, upload)
            elif method == b"PUT":
                await self._put(exchange, upload, target)
            elif method == b"GET":
                self._status(exchange, upload, 204)
            elif method == b"DELETE":
                if upload.busy:
                    raise _upload_busy(upload)
                self.uploads.drop(upload)
                exchange.request.setResponseCode(204)
                exchange.finish()
            else:
                raise RegistryError.unsupported(f"{method.decode()} of an upload", status=405)
        elif route.kind is Kind.MANIFEST and method == b"PUT":
            await self._put_manifest(exchange, route, target)
        elif route.kind is Kind.MANIFEST and method == b"DELETE":
            discard_body(exchange)
            await target.delete_manifest(route)
            exchange.request.setResponseCode(202)
            exchange.finish()
        elif route.kind is Kind.BLOB and method == b"DELETE":
            raise RegistryError.unsupported(
                "blobs are not deleted one by one: delete the manifests, and"
                " txregistry cache gc removes the blobs nothing names any more",
                status=405,
            )
        else:
            raise RegistryError.unsupported(
                f"{method.decode('ascii', 'replace')} of {route.kind.value}", status=405
            )

    # Blobs.

    async def _post(self, exchange: Exchange, route: Route, target: IPushTarget) -> None:
        args = _args(exchange)
        mount, source = args.get("mount"), args.get("from")
        if mount:
            digest = Digest.parse(mount)
            if source and await target.mount(route, digest, source):
                discard_body(exchange)
                self._blob_created(exchange, route, digest)
                return
        digest_text = args.get("digest")
        if digest_text:
            digest = Digest.parse(digest_text)
            upload = self.uploads.start(route, digest.algorithm)
            try:
                await self._receive(exchange, upload)
            except BaseException:
                # The client never learnt this upload's id, so nothing can
                # resume it: it would only hold a staged file (and one of
                # the uploads allowed) until it expired.
                self.uploads.drop(upload)
                raise
            await self._finish(exchange, upload, digest, target)
            return
        discard_body(exchange)
        upload = self.uploads.start(route)
        self.log.debug(
            "upload {id} started to {repository}", id=upload.id, repository=upload.repository
        )
        self._status(exchange, upload, 202)

    async def _patch(self, exchange: Exchange, upload: Upload) -> None:
        ends_at = self._check_range(exchange, upload)
        await self._receive(exchange, upload, ends_at)
        self._status(exchange, upload, 202)

    async def _put(self, exchange: Exchange, upload: Upload, target: IPushTarget) -> None:
        digest_text = _args(exchange).get("digest")
        if not digest_text:
            raise RegistryError.digest_invalid("a PUT that ends an upload needs ?digest=")
        digest = Digest.parse(digest_text)
        if upload.busy:
            raise _upload_busy(upload)
        body = _body(exchange)
        ends_at = None
        if body.length != 0:
            ends_at = self._check_range(exchange, upload)
        await self._receive(exchange, upload, ends_at)
        await self._finish(exchange, upload, digest, target)

    def _check_range(self, exchange: Exchange, upload: Upload) -> int | None:
        """
        A chunk must start where the upload ends: else 416, with where that
        is.  Returns where its C{Content-Range} says the upload then ends.
        """
        if upload.busy:
            raise _upload_busy(upload)
        header = exchange.request.getHeader(b"content-range")
        if header is None:
            return None
        match = _CONTENT_RANGE_RE.fullmatch(header.decode("latin-1").strip())
        if match is None:
            raise RegistryError(
                400, "BLOB_UPLOAD_INVALID", f"malformed Content-Range {header[:100]!r}"
            )
        start, end = int(match[1]), int(match[2])
        length = _body(exchange).length
        if start != upload.received or end < start:
            raise RegistryError(
                416,
                "BLOB_UPLOAD_INVALID",
                f"chunk {start}-{end} is out of order: upload {upload.id} has"
                f" {upload.received} bytes, so the next chunk starts at {upload.received}",
                headers={"Range": _range(upload), "Location": _upload_location(exchange, upload)},
            )
        if length is not None and length != end - start + 1:
            raise RegistryError(
                400,
                "BLOB_UPLOAD_INVALID",
                f"Content-Range {start}-{end} is {end - start + 1} bytes,"
                f" but Content-Length is {length}",
            )
        return end + 1

    async def _receive(
        self, exchange: Exchange, upload: Upload, ends_at: int | None = None
    ) -> None:
        """Append the request's body to C{upload}, as it arrives."""
        body = _body(exchange)
        upload.busy = True
        self.uploads.touch(upload)
        sink = _UploadSink(exchange, self.uploads, upload, body, ends_at)
        body.attach(sink)
        try:
            await sink.deferred
        finally:
            upload.busy = False
            self.uploads.touch(upload)

    async def _finish(
        self, exchange: Exchange, upload: Upload, digest: Digest, target: IPushTarget
    ) -> None:
        blob = await self.uploads.complete(upload, digest)
        try:
            await target.receive_blob(upload.route, blob)
        finally:
            self.uploads.release(upload)
        self._blob_created(exchange, upload.route, digest)

    def _blob_created(self, exchange: Exchange, route: Route, digest: Digest) -> None:
        request = exchange.request
        request.setResponseCode(201)
        exchange.set("Location", f"{_name_path(exchange, b'/blobs/')}/blobs/{digest}")
        exchange.set("Docker-Content-Digest", str(digest))
        exchange.set("Content-Length", 0)
        exchange.finish()

    def _status(self, exchange: Exchange, upload: Upload, code: int) -> None:
        exchange.request.setResponseCode(code)
        exchange.set("Location", _upload_location(exchange, upload))
        exchange.set("Range", _range(upload))
        exchange.set("Docker-Upload-UUID", upload.id)
        exchange.set("Content-Length", 0)
        exchange.finish()

    # Manifests.

    async def _put_manifest(self, exchange: Exchange, route: Route, target: IPushTarget) -> None:
        body = _body(exchange)
        if body.length is not None and body.length > MAX_MANIFEST_SIZE:
            raise manifest_too_large(body.length)
        collect = _Collect(exchange, MAX_MANIFEST_SIZE)
        body.attach(collect)
        await collect.deferred
        content_type = (exchange.request.getHeader(b"content-type") or b"").decode("latin-1")
        tag = str(route.reference) if isinstance(route.reference, Tag) else None
        manifest = parse_pushed(b"".join(collect.parts), content_type, tag)
        if isinstance(route.reference, Digest) and route.reference != manifest.digest:
            raise RegistryError.digest_invalid(
                f"the manifest pushed as {route.reference} has digest {manifest.digest}"
            )
        where = f"{route.registry.name}/{route.repository}"
        for digest in manifest.references:
            if await target.blob_size(route, digest) is None:
                raise manifest_blob_unknown(digest, where)
        for digest in manifest.manifests:
            if not await target.has_manifest(route, digest):
                raise manifest_blob_unknown(digest, where, "manifest")
        await target.receive_manifest(route, manifest)
        request = exchange.request
        request.setResponseCode(201)
        exchange.set(
            "Location", f"{_name_path(exchange, b'/manifests/')}/manifests/{manifest.digest}"
        )
        exchange.set("Docker-Content-Digest", str(manifest.digest))
        if manifest.subject is not None:
            exchange.set("OCI-Subject", str(manifest.subject))
        exchange.set("Content-Length", 0)
        exchange.finish()


def _body(exchange: Exchange) -> StreamedBody:
    body = getattr(exchange.request, "body", None)
    if not isinstance(body, StreamedBody):
        raise RuntimeError("a push request was rendered without a streamed body")
    return body


def discard_body(exchange: Exchange) -> None:
    """A request whose body (if any) is of no use: drop it as it comes."""
    body = getattr(exchange.request, "body", None)
    if isinstance(body, StreamedBody) and not body.attached:
        body.attach(_Ignore())


class _Ignore:
    def body_data(self, data: bytes) -> None:
        pass

    def body_end(self) -> None:
        pass


def _args(exchange: Exchange) -> dict[str, str]:
    args = exchange.request.args or {}
    return {
        key.decode("latin-1"): values[0].decode("latin-1") for key, values in args.items() if values
    }


def _name_path(exchange: Exchange, separator: bytes) -> str:
    """C{/v2/<name>} as the client spelled it (with its registry prefix, without library/)."""
    path = exchange.request.path
    return path[: path.rfind(separator)].decode("ascii")


def _upload_location(exchange: Exchange, upload: Upload) -> str:
    return f"{_name_path(exchange, b'/blobs/uploads')}/blobs/uploads/{upload.id}"
