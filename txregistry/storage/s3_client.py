"""
An S3 client on Twisted: botocore signs, treq sends.

botocore is used for what it does well and nothing else: SigV4 signing
(L{botocore.auth.S3SigV4Auth}) of requests we build ourselves.  Its HTTP
stack, its retries and its thread-bound sessions are not used: treq sends
every request on the reactor, bodies stream with flow control, and
failures come back to us, where L{S3Client} retries C{SlowDown}, C{503}
and cut connections with a backoff on the injected clock.  (boto3 in a
thread pool would hold a thread per transfer; aiobotocore needs the asyncio
reactor; txaws is unmaintained.)

Responses are S3's XML, read with the standard library: the few shapes we
use (errors, listings, multipart uploads) need no model.

No key ever leaves this module in a message: errors say which operation
on which object failed and what S3 answered, never a header or a signed URL.
"""

from __future__ import annotations

import hashlib
import os
import random
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import treq
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from txregistry.config.model import Secret

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
# S3's error codes that mean "try again later", beside any 5xx status.
_RETRYABLE_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"})


class S3Error(Exception):
    """
    A request to the bucket failed: S3 answered with an error, or could not
    be reached.  The message names the operation and the object, never a key.
    """

    def __init__(self, operation: str, status: int | None, code: str, message: str) -> None:
        where = f"S3 {operation}"
        answer = f"{status} {code}" if status is not None else code
        super().__init__(f"{where}: {answer}: {message}" if message else f"{where}: {answer}")
        self.operation = operation
        self.status = status
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status >= 500 or self.code in _RETRYABLE_CODES


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    last_modified: str


@dataclass(frozen=True)
class ListedUpload:
    key: str
    upload_id: str
    initiated: str


@dataclass(frozen=True)
class Backoff:
    """How failed requests are retried: C{attempts} in all, exponential delays with jitter."""

    attempts: int = 4
    first_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, retry: int, jitter: Callable[[], float] = random.random) -> float:
        """The wait before retry number C{retry} (1 for the first)."""
        base = min(self.max_delay, self.first_delay * (2 ** (retry - 1)))
        return float(base * (0.5 + jitter() / 2))


class S3Client:
    """
    Signed requests to one bucket.

    @param endpoint: C{https://s3.eu-west-1.amazonaws.com}, or a MinIO or
        Swift URL.
    @param path_style: C{endpoint/bucket/key} rather than
        C{bucket.endpoint/key}.
    """

    log = Logger()

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        endpoint: str,
        bucket: str,
        region: str,
        path_style: bool,
        access_key: Secret,
        secret_key: Secret,
        backoff: Backoff = Backoff(),
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._http = HTTPClient(agent)
        self._clock = clock
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.region = region
        self.path_style = path_style
        self._credentials = Credentials(access_key.reveal(), secret_key.reveal())
        self.backoff = backoff
        self._jitter = jitter
        # Requests retried after a failure, for metrics and tests.
        self.retries = 0

    def url(self, key: str, query: dict[str, str] | None = None) -> str:
        parts = urlsplit(self.endpoint)
        path = quote(key, safe="/-_.~")
        if self.path_style:
            base = f"{parts.scheme}://{parts.netloc}{parts.path}/{self.bucket}/{path}"
        else:
            base = f"{parts.scheme}://{self.bucket}.{parts.netloc}{parts.path}/{path}"
        if query:
            base += "?" + urlencode(sorted(query.items()), quote_via=quote)
        return base

    def signed_headers(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        body_sha256: str | None = None,
    ) -> dict[str, str]:
        """
        C{headers} with SigV4's, for a body given in full: its SHA-256 is
        signed, so S3 refuses a body changed on the way.  A caller that hashed
        a large body off the reactor thread passes C{body_sha256}.
        """
        request = AWSRequest(method=method, url=url, headers=dict(headers), data=b"")
        request.headers["X-Amz-Content-SHA256"] = body_sha256 or hashlib.sha256(body).hexdigest()
        _Signer(self._credentials, "s3", self.region).add_auth(request)
        return {name: value for name, value in request.headers.items()}

    def presigned_url(self, key: str, expires: int = 300) -> str:
        """A GET URL for C{key} that needs no headers (for the benchmark's baseline)."""
        from botocore.auth import S3SigV4QueryAuth

        request = AWSRequest(method="GET", url=self.url(key))
        S3SigV4QueryAuth(self._credentials, "s3", self.region, expires=expires).add_auth(request)
        return str(request.url)

    async def request(
        self,
        operation: str,
        method: str,
        key: str,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | BodyFactory = b"",
        ok: tuple[int, ...] = (200,),
        missing_ok: bool = False,
        body_sha256: str | None = None,
    ) -> IResponse | None:
        """
        Send one signed request, retrying what S3 says to retry with a
        backoff; the body of the answer is left unread (C{unbuffered}) for
        the caller.  A 404 is C{None} when C{missing_ok}.

        @raise S3Error: the last failure, when no attempt is left or it is not retryable.
        """
        url = self.url(key, query)
        retry = 0
        while True:
            try:
                response = await self._send(method, url, headers or {}, body, body_sha256)
                if response.code in ok:
                    return response
                if response.code == 404 and missing_ok:
                    await treq.content(response)
                    return None
                raise await _error(operation, key, response)
            except S3Error as error:
                failure = error
            except Exception as error:  # connection refused, cut, timed out
                failure = S3Error(operation, None, "unreachable", f"{key}: {error}")
            retry += 1
            if not failure.retryable or retry >= self.backoff.attempts:
                raise failure
            self.retries += 1
            delay = self.backoff.delay(retry, self._jitter)
            self.log.info("{failure}; retrying in {delay:.1f} s", failure=str(failure), delay=delay)
            await deferLater(self._clock, delay, lambda: None)

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | BodyFactory,
        body_sha256: str | None,
    ) -> Deferred[IResponse]:
        if callable(body):
            # A body streamed from a file: a new producer for each attempt.
            assert body_sha256 is not None, "a streamed body is signed by its hash"
            signed = self.signed_headers(method, url, headers, b"", body_sha256)
            producer: IBodyProducer | None = body()
        else:
            signed = self.signed_headers(method, url, headers, body, body_sha256)
            producer = _Body(body) if body else None
        sent: Deferred[IResponse] = self._http.request(  # type: ignore[assignment]
            method,
            url,
            headers=Headers({name: [value] for name, value in signed.items()}),
            data=producer,
            unbuffered=True,
            allow_redirects=False,
        )
        return sent

    # Objects.

    async def put_object(
        self,
        key: str,
        body: bytes | BodyFactory,
        content_type: str = "application/octet-stream",
        sha256: str | None = None,
    ) -> None:
        headers = {"Content-Type": content_type}
        response = await self.request(
            "PUT", "PUT", key, headers=headers, body=body, body_sha256=sha256
        )
        assert response is not None
        await treq.content(response)

    async def get_object(
        self, key: str, byte_range: tuple[int, int] | None = None
    ) -> IResponse | None:
        """The object's response, its body unread, or None if there is none."""
        headers = {}
        ok: tuple[int, ...] = (200,)
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
            ok = (200, 206)
        return await self.request("GET", "GET", key, headers=headers, ok=ok, missing_ok=True)

    async def get_small(self, key: str) -> bytes | None:
        """A small object's bytes (a manifest, a tag answer), or None."""
        response = await self.get_object(key)
        if response is None:
            return None
        body: bytes = await treq.content(response)
        return body

    async def head_object(self, key: str) -> Headers | None:
        response = await self.request("HEAD", "HEAD", key, missing_ok=True)
        if response is None:
            return None
        await treq.content(response)
        headers: Headers = response.headers
        return headers

    async def head_bucket(self) -> None:
        """Whether the bucket is there and ours to use: raises L{S3Error} if not."""
        response = await self.request("HEAD bucket", "HEAD", "")
        assert response is not None
        await treq.content(response)

    async def delete_object(self, key: str) -> None:
        response = await self.request("DELETE", "DELETE", key, ok=(200, 204), missing_ok=True)
        if response is not None:
            await treq.content(response)

    async def copy_metadata(self, key: str, metadata: dict[str, str]) -> None:
        """Replace an object's metadata in place (a copy onto itself, no bytes moved by us)."""
        headers = {f"x-amz-meta-{name}": value for name, value in metadata.items()}
        headers["x-amz-copy-source"] = quote(f"/{self.bucket}/{key}", safe="/-_.~")
        headers["x-amz-metadata-directive"] = "REPLACE"
        response = await self.request("COPY", "PUT", key, headers=headers)
        assert response is not None
        await _xml(response)

    async def list_objects(self, prefix: str) -> list[ListedObject]:
        """Every object under C{prefix}, page by page (for upkeep, never to decide a miss)."""
        found: list[ListedObject] = []
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            response = await self.request("LIST", "GET", "", query=query)
            assert response is not None
            root = await _xml(response)
            for item in root.iter(f"{_NS}Contents"):
                found.append(
                    ListedObject(
                        _text(item, "Key"),
                        int(_text(item, "Size") or 0),
                        _text(item, "LastModified"),
                    )
                )
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return found

    # Multipart uploads.

    async def create_multipart(self, key: str, metadata: dict[str, str] | None = None) -> str:
        headers = {f"x-amz-meta-{name}": value for name, value in (metadata or {}).items()}
        response = await self.request(
            "CreateMultipartUpload", "POST", key, query={"uploads": ""}, headers=headers
        )
        assert response is not None
        return _text(await _xml(response), "UploadId")

    async def upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        body: bytes | BodyFactory,
        body_sha256: str | None = None,
    ) -> str:
        response = await self.request(
            "UploadPart",
            "PUT",
            key,
            query={"partNumber": str(number), "uploadId": upload_id},
            body=body,
            body_sha256=body_sha256,
        )
        assert response is not None
        await treq.content(response)
        etag = response.headers.getRawHeaders("etag", [""])[0]
        return str(etag)

    async def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = "".join(
            f"<Part><PartNumber>{number}</PartNumber><ETag>{etag}</ETag></Part>"
            for number, etag in enumerate(etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        response = await self.request(
            "CompleteMultipartUpload", "POST", key, query={"uploadId": upload_id}, body=body
        )
        assert response is not None
        # S3 may answer 200 with an error in the body, after a long completion.
        root = await _xml(response)
        if root.tag in ("Error", f"{_NS}Error"):
            raise S3Error(
                "CompleteMultipartUpload",
                200,
                _text(root, "Code"),
                f"{key}: {_text(root, 'Message')}",
            )

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        response = await self.request(
            "AbortMultipartUpload",
            "DELETE",
            key,
            query={"uploadId": upload_id},
            ok=(200, 204),
            missing_ok=True,
        )
        if response is not None:
            await treq.content(response)

    async def list_multipart_uploads(self, prefix: str) -> list[ListedUpload]:
        response = await self.request(
            "ListMultipartUploads", "GET", "", query={"uploads": "", "prefix": prefix}
        )
        assert response is not None
        root = await _xml(response)
        return [
            ListedUpload(_text(item, "Key"), _text(item, "UploadId"), _text(item, "Initiated"))
            for item in root.iter(f"{_NS}Upload")
        ]


# Makes a fresh producer of a request's body, for each attempt.
BodyFactory = Callable[[], IBodyProducer]


class FileRange:
    """
    C{length} bytes of an open file from C{offset}, as a file object that
    L{twisted.web.client.FileBodyProducer} reads a chunk at a time (with
    C{pread}, so that the descriptor's position is nobody's business):
    a part goes up without ever being in memory whole.
    """

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd = fd
        self._start = offset
        self._length = length
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._position
        size = left if size < 0 else min(size, left)
        if size <= 0:
            return b""
        data = os.pread(self._fd, size, self._start + self._position)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        pass


def file_range_body(fd: int, offset: int, length: int) -> BodyFactory:
    """A body factory for a range of a file, read 256 KiB at a time."""
    return lambda: FileBodyProducer(FileRange(fd, offset, length), readSize=256 << 10)


@implementer(IBodyProducer)
class _Body:
    """
    A request body already in memory (a part is at most one part size),
    written at once: unlike treq's own, it needs no cooperator, so that the
    same code runs on the reactor and in memory tests.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Signer(S3SigV4Auth):  # type: ignore[misc]
    """SigV4 over the payload hash we put in the request ourselves."""

    def payload(self, request: Any) -> str:
        return str(request.headers["X-Amz-Content-SHA256"])

    def _modify_request_before_signing(self, request: Any) -> None:
        payload = request.headers["X-Amz-Content-SHA256"]
        super()._modify_request_before_signing(request)
        del request.headers["X-Amz-Content-SHA256"]
        request.headers["X-Amz-Content-SHA256"] = payload


def _text(element: ElementTree.Element, name: str) -> str:
    found = element.find(f"{_NS}{name}")
    if found is None:
        found = element.find(name)
    return (found.text or "") if found is not None else ""


async def _xml(response: IResponse) -> ElementTree.Element:
    body = await treq.content(response)
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise S3Error(
            "response", response.code, "MalformedXML", f"S3 sent unreadable XML: {e}"
        ) from None


async def _error(operation: str, key: str, response: IResponse) -> S3Error:
    body = await treq.content(response)
    code, message = "", ""
    try:
        root = ElementTree.fromstring(body)
        code, message = _text(root, "Code"), _text(root, "Message")
    except ElementTree.ParseError:
        pass
    return S3Error(
        operation,
        response.code,
        code or response.phrase.decode("latin-1"),
        f"{key or '(bucket)'}: {message}",
    )
