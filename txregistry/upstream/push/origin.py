"""
Pushing blobs and manifests to a registry's origin, the first mirror that
resolves tags (push-through).

A blob goes as the distribution spec's chunked upload ("Pushing a blob in
chunks"): C{HEAD} to skip what the origin has, C{POST} to open an upload,
C{PATCH} chunks of at most C{push_chunk_size} (and at least the origin's
C{OCI-Chunk-Min-Length}) with C{Content-Range}, then C{PUT ?digest=}.
Chunks keep every request body under a proxy's or CDN's body limit, which a
monolithic upload of a large layer would exceed.

A chunk that fails (a cut connection, a stall, a 5xx) is resumed from the
offset the origin reports for the upload (C{GET}, C{204} with
C{Range: 0-<last>}); an upload the origin no longer knows is begun again.

Requests are authenticated as the registry's pulls are
(L{txregistry.upstream.auth}), with a token for
C{repository:<name>:pull,push}, or Basic when the origin asks for it (never
to Docker Hub's API).  A C{Location} may be relative or absolute; one on
another host is sent no credentials, and one that turns https into http is
refused (see L{txregistry.upstream.push.diagnosis}).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from txregistry.config import MirrorConfig, RegistryConfig
from txregistry.oci.errors import error_code_and_message
from txregistry.oci.reference import Digest
from txregistry.upstream.auth import (
    AuthError,
    Challenge,
    TokenFetcher,
    TokenKey,
    basic_authorization,
    parse_www_authenticate,
)
from txregistry.upstream.bodies import describe_failure, discard_body, header, read_body
from txregistry.upstream.client import MAX_ERROR_BODY, USER_AGENT
from txregistry.upstream.push.body import ChunkProducer, PushSource, Watchdog
from txregistry.upstream.push.diagnosis import (
    SCHEME_CAUSE,
    STORAGE_CAUSE,
    OriginAnswer,
    PushFailed,
    body_limit_cause,
    format_size,
    near_round_size,
)
from txregistry.upstream.transport import registry_http_client

# Digests this pusher saw the origin accept, per repository, so that a
# manifest's BLOB_UNKNOWN can be told apart from a blob never pushed.
_REMEMBERED_BLOBS = 4096
_BLOB_UNKNOWN_CODES = ("BLOB_UNKNOWN", "MANIFEST_BLOB_UNKNOWN")


# Makes a request's body, given the watchdog's poke: a fresh one each time
# the request is sent (again, after a 401).
_BodyFactory = Callable[[Callable[[], None]], ChunkProducer]


def push_scope(repository: str) -> str:
    """The token scope for pushing to (and so pulling from) a repository."""
    return f"repository:{repository}:pull,push"


class _NoAnswer(Exception):
    """A request got no response: the connection failed, was cut, or stalled."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Upload:
    """An upload in progress at the origin: where to send the next request, and how far it is."""

    url: str
    offset: int = 0
    min_chunk: int = 0


class OriginPusher:
    """
    Pushes to one registry's origin.

    @param agent: the registry's own agent (L{txregistry.upstream.endpoints}),
        so that pushes go the way its pulls go: address family, TLS, proxy.
    """

    log = Logger()

    def __init__(
        self,
        registry: RegistryConfig,
        agent: IAgent,
        clock: IReactorTime,
        chunk_size: int | None = None,
    ) -> None:
        origin = next((m for m in registry.mirrors if m.resolve_tags), None)
        if origin is None:
            raise ValueError(f"registry {registry.name} has no mirror that resolves tags")
        self.registry = registry
        self.origin: MirrorConfig = origin
        self.chunk_size = chunk_size or registry.push_chunk_size
        self._clock = clock
        self._http = registry_http_client(agent)
        self._tokens = TokenFetcher(agent, clock, registry.name, registry.upstream.response_timeout)
        self._challenge: Challenge | None = None
        self._response_timeout = registry.upstream.response_timeout
        self._body_timeout = registry.upstream.body_timeout
        self._attempts = registry.upstream.resume_attempts
        self._accepted: OrderedDict[tuple[str, str], None] = OrderedDict()

    # Blobs.

    async def push_blob(
        self, repository: str, digest: Digest, size: int, source: PushSource
    ) -> bool:
        """
        Push one blob, unless the origin has it.  Fires with whether it was
        uploaded (False: the origin had it).

        @raise PushFailed: naming the step and the likely cause.
        """
        what = f"{repository}@{digest}"
        if await self.has_blob(repository, digest):
            self.log.info(
                "push {what} to {origin}: the origin has it already", what=what, origin=self._name
            )
            self._remember(repository, digest)
            return False
        upload = await self._start_upload(repository, what)
        chunk = self.chunk_size
        if upload.min_chunk > chunk:
            self.log.warn(
                "push {what}: the origin wants chunks of at least {min} bytes"
                " (OCI-Chunk-Min-Length), more than push_chunk_size {chunk}: sending {min}",
                what=what,
                min=upload.min_chunk,
                chunk=chunk,
            )
            chunk = upload.min_chunk
        cuts: list[str] = []
        while upload.offset < size:
            length = min(chunk, size - upload.offset)
            try:
                await self._patch(upload, source, length, what)
                cuts = []
                continue
            except _Retry as retry:
                failure = retry.failure
            cuts.append(failure.answer.describe())
            if len(cuts) > self._attempts:
                cause = None
                if len(cuts) > 1 and (
                    all(c == cuts[0] for c in cuts) or failure.answer.status is None
                ):
                    cause = (
                        f"the chunk at offset {upload.offset} failed {len(cuts)} times;"
                        f" {body_limit_cause(chunk)}, or the link to the origin is unstable"
                    )
                raise PushFailed(self._name, failure.step, failure.answer, cause, what)
            self.log.warn(
                "push {what}: {reason}; asking the origin how far the upload got"
                " (resume {count} of {attempts})",
                what=what,
                reason=failure.message,
                count=len(cuts),
                attempts=self._attempts,
            )
            before = upload.offset
            upload = await self._resume(repository, upload, what)
            received = upload.offset - before
            limit = near_round_size(received) if received > 0 else None
            if failure.answer.status is None and limit is not None:
                # The connection was cut once the origin had a round number
                # of bytes of the chunk: the next try would stop there too.
                raise PushFailed(
                    self._name,
                    failure.step,
                    OriginAnswer(
                        message=f"{failure.answer.message}; the origin received {received}"
                        f" bytes of the chunk, just short of {_size_and_bytes(limit)}"
                    ),
                    body_limit_cause(chunk),
                    what,
                )
        await self._finish_upload(upload, digest, size, what)
        self._remember(repository, digest)
        return True

    async def has_blob(self, repository: str, digest: Digest) -> bool:
        """Whether the origin has a blob (C{HEAD}, 200)."""
        return await self.blob_size(repository, digest) is not None

    async def blob_size(self, repository: str, digest: Digest) -> int | None:
        """The size of a blob the origin has (C{HEAD}), or None if it has none."""
        return await self._head(repository, f"blobs/{digest}", "HEAD of the blob", str(digest))

    async def has_manifest(self, repository: str, digest: Digest) -> bool:
        """Whether the origin has a manifest (C{HEAD}, 200)."""
        step = "HEAD of the manifest"
        return await self._head(repository, f"manifests/{digest}", step, str(digest)) is not None

    async def _head(self, repository: str, path: str, step: str, name: str) -> int | None:
        what = f"{repository}@{name}"
        response = await self._ask(b"HEAD", self._url(repository, path), step, what)
        discard_body(response)
        if response.code == 200:
            length = header(response, "Content-Length")
            return int(length) if length is not None and length.isdigit() else 0
        if response.code == 404:
            return None
        raise await self._failed(step, response, what)

    async def mount(self, repository: str, digest: Digest, from_repository: str) -> bool:
        """
        Ask the origin to mount a blob from another of its repositories
        (C{POST ?mount=&from=}): whether it did.  An upload it opens instead
        is cancelled: the client is given one of txregistry's own.
        """
        step = "POST ?mount= (cross-repository mount)"
        what = f"{repository}@{digest}"
        query = urlencode({"mount": str(digest), "from": from_repository})
        url = self._url(repository, f"blobs/uploads/?{query}")
        response = await self._ask(b"POST", url, step, what)
        discard_body(response)
        if response.code == 201:
            self.log.info(
                "push {what}: mounted from {source} at the origin",
                what=what,
                source=from_repository,
            )
            self._remember(repository, digest)
            return True
        location = header(response, "Location")
        if response.code == 202 and location:
            try:
                cancelled = await self._send(b"DELETE", urljoin(url, location), "DELETE")
                discard_body(cancelled)
            except _NoAnswer:
                pass
        return False

    async def _start_upload(self, repository: str, what: str) -> _Upload:
        step = "POST (starting the upload)"
        url = self._url(repository, "blobs/uploads/")
        self.log.info("push {what}: POST {url}", what=what, url=_display(url))
        response = await self._ask(b"POST", url, step, what)
        if response.code != 202:
            raise await self._failed(step, response, what)
        discard_body(response)
        upload = _Upload(self._location(response, url, step, what))
        minimum = header(response, "OCI-Chunk-Min-Length")
        if minimum is not None and minimum.strip().isdigit():
            upload.min_chunk = int(minimum)
        return upload

    async def _patch(self, upload: _Upload, source: PushSource, length: int, what: str) -> None:
        start, end = upload.offset, upload.offset + length
        step = f"PATCH of the chunk at offset {start} ({format_size(length)})"
        self.log.info(
            "push {what}: PATCH chunk at offset {offset}, {size} bytes",
            what=what,
            offset=start,
            size=length,
        )
        headers = {
            b"Content-Type": b"application/octet-stream",
            b"Content-Range": f"{start}-{end - 1}".encode(),
        }
        try:
            response = await self._send(
                b"PATCH",
                upload.url,
                step,
                headers,
                lambda poke: ChunkProducer(source, start, length, poke),
            )
        except _NoAnswer as e:
            failure = PushFailed(self._name, step, OriginAnswer(message=e.reason), what=what)
            raise _Retry(failure) from None
        if response.code == 413:
            raise await self._failed(step, response, what, body_limit_cause(length))
        if response.code >= 500 or response.code == 416:
            # A 416: the origin holds another length than we thought; its
            # upload status says which, and the push goes on from there.
            raise _Retry(await self._failed(step, response, what))
        if response.code != 202:
            raise await self._failed(step, response, what)
        discard_body(response)
        upload.url = self._location(response, upload.url, step, what)
        upload.offset = _range_end(header(response, "Range"), end)

    async def _resume(self, repository: str, upload: _Upload, what: str) -> _Upload:
        """The upload as the origin has it (C{GET}), or a new one if it has none."""
        step = "GET of the upload's status"
        response: IResponse | None
        try:
            response = await self._send(b"GET", upload.url, step)
        except _NoAnswer:
            response = None
        if response is not None and response.code == 204:
            discard_body(response)
            offset = _range_end(header(response, "Range"), 0)
            location = header(response, "Location")
            url = self._location(response, upload.url, step, what) if location else upload.url
            self.log.info(
                "push {what}: the origin has {offset} bytes of the upload; resuming there",
                what=what,
                offset=offset,
            )
            return _Upload(url, offset, upload.min_chunk)
        if response is not None:
            discard_body(response)
            status = f"HTTP {response.code}"
        else:
            status = "no answer"
        self.log.info(
            "push {what}: the origin has lost the upload ({status}); starting it again",
            what=what,
            status=status,
        )
        return await self._start_upload(repository, what)

    async def _finish_upload(self, upload: _Upload, digest: Digest, size: int, what: str) -> None:
        step = "PUT ?digest= (completing the upload)"
        url = _with_query(upload.url, {"digest": str(digest)})
        self.log.info("push {what}: PUT after {size} bytes", what=what, size=size)
        response = await self._ask(b"PUT", url, step, what)
        if response.code != 201:
            raise await self._failed(step, response, what)
        discard_body(response)
        announced = header(response, "Docker-Content-Digest")
        if announced and announced != str(digest):
            raise PushFailed(
                self._name,
                step,
                OriginAnswer(201, None, f"the origin stored {announced}, not {digest}"),
                "the blob was changed on its way to the origin: a proxy that rewrites bodies",
                what,
            )

    def _remember(self, repository: str, digest: Digest) -> None:
        key = (repository, str(digest))
        self._accepted[key] = None
        self._accepted.move_to_end(key)
        while len(self._accepted) > _REMEMBERED_BLOBS:
            self._accepted.popitem(last=False)

    # Manifests.

    async def push_manifest(
        self, repository: str, reference: str, media_type: str, body: bytes
    ) -> None:
        """
        PUT a manifest by tag or digest.  A C{BLOB_UNKNOWN} for a manifest
        whose blobs the origin accepted is diagnosed as the origin's storage.

        @raise PushFailed: naming the step and the likely cause.
        """
        what = f"{repository}:{reference}" if ":" not in reference else f"{repository}@{reference}"
        step = "PUT of the manifest"
        url = self._url(repository, f"manifests/{reference}")
        self.log.info(
            "push {what}: PUT manifest, {size} bytes of {media_type}",
            what=what,
            size=len(body),
            media_type=media_type,
        )
        headers = {b"Content-Type": media_type.encode("latin-1")}
        response = await self._ask(
            b"PUT", url, step, what, headers, lambda poke: _BytesProducer(body, poke)
        )
        if response.code == 201:
            discard_body(response)
            return
        failure = await self._failed(step, response, what)
        if failure.answer.code in _BLOB_UNKNOWN_CODES:
            failure = await self._explain_unknown_blob(repository, body, failure, what)
        raise failure

    async def _explain_unknown_blob(
        self, repository: str, body: bytes, failure: PushFailed, what: str
    ) -> PushFailed:
        never_pushed = []
        for digest in _blobs_named(body):
            if (repository, digest) in self._accepted:
                continue
            try:
                present = await self.has_blob(repository, Digest.parse(digest))
            except Exception:
                present = False
            if not present:
                never_pushed.append(digest)
        if never_pushed:
            cause = (
                f"the origin has no blob {never_pushed[0]}, and it was not pushed through"
                " txregistry: push the image's blobs before its manifest"
            )
        else:
            cause = STORAGE_CAUSE
        return PushFailed(self._name, failure.step, failure.answer, cause, what)

    async def delete(self, repository: str, path: str) -> int | None:
        """DELETE C{/v2/<repository>/<path>}, for cleaning up; its status, or None."""
        try:
            response = await self._send(b"DELETE", self._url(repository, path), "DELETE")
        except (_NoAnswer, PushFailed):
            return None
        discard_body(response)
        return int(response.code)

    # Requests.

    @property
    def _name(self) -> str:
        return self.origin.url

    def _url(self, repository: str, path: str) -> str:
        return f"{self.origin.url}/v2/{repository}/{path}"

    def _location(self, response: IResponse, base: str, step: str, what: str) -> str:
        """The upload's next URL, from the origin's C{Location}, relative or absolute."""
        location = header(response, "Location")
        if not location:
            raise PushFailed(
                self._name,
                step,
                OriginAnswer(response.code, None, "the answer has no Location header"),
                "the origin is not a registry that supports chunked uploads,"
                " or a proxy dropped the header",
                what,
            )
        url = urljoin(base, location)
        origin_scheme, new_scheme = urlsplit(self.origin.url).scheme, urlsplit(url).scheme
        if origin_scheme == "https" and new_scheme != "https":
            raise PushFailed(
                self._name,
                step,
                OriginAnswer(
                    response.code,
                    None,
                    f"its Location {_display(url)} switches from https to {new_scheme}:"
                    " refused, not followed",
                ),
                SCHEME_CAUSE,
                what,
            )
        return url

    async def _send(
        self,
        method: bytes,
        url: str,
        step: str,
        headers: dict[bytes, bytes] | None = None,
        body: _BodyFactory | None = None,
    ) -> IResponse:
        """
        One request to the origin, authenticated as it asks: a 401 is
        answered once, with fresh credentials, and the request sent again
        (with a fresh body).

        @param body: makes the body producer, given the watchdog's poke.
        @raise _NoAnswer: no answer came.
        @raise PushFailed: the origin's token service refused.
        """
        same_origin = _origin_of(url) == _origin_of(self.origin.url)
        repository = _repository_of(url)
        authorization = None
        if self._challenge is not None and same_origin:
            authorization = await self._authorization(self._challenge, repository, False, step)
        response = await self._once(method, url, step, headers, body, authorization)
        if response.code == 401 and same_origin:
            challenge = self._challenge_in(response)
            if challenge is not None and (
                challenge.scheme == "bearer" or self._challenge != challenge
            ):
                discard_body(response)
                self._challenge = challenge
                authorization = await self._authorization(challenge, repository, True, step)
                response = await self._once(method, url, step, headers, body, authorization)
        return response

    async def _ask(
        self,
        method: bytes,
        url: str,
        step: str,
        what: str,
        headers: dict[bytes, bytes] | None = None,
        body: _BodyFactory | None = None,
    ) -> IResponse:
        """L{_send}, where no answer is the step's failure."""
        try:
            return await self._send(method, url, step, headers, body)
        except _NoAnswer as e:
            failure = PushFailed(self._name, step, OriginAnswer(message=e.reason), what=what)
            self.log.error("{message}", message=failure.message)
            raise failure from None

    async def _once(
        self,
        method: bytes,
        url: str,
        step: str,
        headers: dict[bytes, bytes] | None,
        body: _BodyFactory | None,
        authorization: bytes | None,
    ) -> IResponse:
        sent_headers = Headers({b"User-Agent": [USER_AGENT]})
        for name, value in (headers or {}).items():
            sent_headers.setRawHeaders(name, [value])
        if authorization is not None:
            sent_headers.setRawHeaders(b"Authorization", [authorization])
        request: Deferred[Any] | None = None

        def expire() -> None:
            if request is not None:
                request.cancel()

        timeout = self._body_timeout if body is not None else self._response_timeout
        watchdog = Watchdog(self._clock, timeout, expire)
        producer: ChunkProducer | None = None

        def poke() -> None:
            # Once the body is sent, the origin has response_timeout to answer.
            assert producer is not None
            if producer.sent == producer.length:
                watchdog.poke(self._response_timeout)
            else:
                watchdog.poke()

        if body is not None:
            producer = body(poke)
        try:
            request = self._http.request(
                method.decode("ascii"),
                url.encode("ascii"),
                headers=sent_headers,
                data=producer,
                unbuffered=True,
                allow_redirects=False,
            )
            response: IResponse = await request
            return response
        except Exception as e:
            sent = producer.sent if producer is not None else None
            reason = (
                f"no progress for {watchdog.seconds:g}s"
                if watchdog.expired
                else describe_failure(e)
            )
            if sent is not None:
                reason += f", after sending {sent} bytes of the body"
            raise _NoAnswer(reason) from None
        finally:
            watchdog.stop()

    def _challenge_in(self, response: IResponse) -> Challenge | None:
        values = [
            v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])
        ]
        challenges = parse_www_authenticate(values)
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.realm:
                return challenge
        credentials = self.registry.credentials_for(self.origin)
        for challenge in challenges:
            if challenge.scheme == "basic" and credentials and not self.origin.is_docker_hub:
                return challenge
        return None

    async def _authorization(
        self, challenge: Challenge, repository: str, fresh: bool, step: str
    ) -> bytes | None:
        credentials = self.registry.credentials_for(self.origin)
        if challenge.scheme == "basic":
            return basic_authorization(credentials) if credentials else None
        realm = challenge.realm
        if realm is None or urlsplit(realm).scheme not in ("http", "https"):
            return None
        # The push scope, whatever the challenge's: a HEAD is challenged
        # for pull alone, and the PATCH after it needs push.
        key = TokenKey(
            realm, challenge.params.get("service", ""), push_scope(repository), credentials
        )
        if fresh:
            self._tokens.discard(key)
        try:
            token = await self._tokens.token(key)
        except AuthError as e:
            raise PushFailed(
                self._name,
                step,
                OriginAnswer(e.status, None, str(e)),
                "the registry's credentials do not allow pushing to this repository:"
                " check username and password, and the account's rights",
            ) from None
        return b"Bearer " + token.encode("ascii")

    async def _failed(
        self, step: str, response: IResponse, what: str, cause: str | None = None
    ) -> PushFailed:
        """The error for an answer that is not the one the step needs; logged."""
        body = b""
        if response.code != 204:
            try:
                body = await read_body(response, MAX_ERROR_BODY)
            except Exception:
                body = b""
        code, message = error_code_and_message(body) if body else (None, "")
        if code is None:
            message = _one_line(body)
        if response.code == 413 and cause is None:
            cause = body_limit_cause(self.chunk_size)
        if response.code == 401 and cause is None:
            if self.registry.credentials_for(self.origin) is None:
                cause = (
                    "the origin wants credentials to push, and the registry has none:"
                    " set username and password_file (or password_env) for it"
                )
            else:
                cause = "the origin refused the registry's credentials: check them"
        failure = PushFailed(
            self._name, step, OriginAnswer(int(response.code), code, message), cause, what
        )
        self.log.error("{message}", message=failure.message)
        return failure


class _Retry(Exception):
    """A chunk failed in a way that resuming may get past."""

    def __init__(self, failure: PushFailed) -> None:
        super().__init__(failure.message)
        self.failure = failure


class _BytesProducer(ChunkProducer):
    """A small body held in memory: a manifest, at most 4 MiB."""

    def __init__(self, body: bytes, poke: Callable[[], None]) -> None:
        super().__init__(_Bytes(body), 0, len(body), poke)


class _Bytes:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def read(self, offset: int, length: int) -> bytes:
        return self._body[offset : offset + length]


def _range_end(value: str | None, default: int) -> int:
    """
    The offset after C{Range: 0-<last>} (the spec's form; distribution
    sends it without C{bytes=}).  C{0-0} is read as nothing received:
    distribution reports an empty upload so.
    """
    if value is None:
        return default
    text = value.strip().removeprefix("bytes=")
    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit()):
        return default
    end = int(last)
    return 0 if end == 0 else end + 1


def _with_query(url: str, query: dict[str, str]) -> str:
    separator = "&" if urlsplit(url).query else "?"
    return url + separator + urlencode(query)


def _origin_of(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _repository_of(url: str) -> str:
    """The repository of a C{/v2/<name>/blobs|manifests/...} URL, for the token's scope."""
    path = urlsplit(url).path.removeprefix("/v2/")
    for marker in ("/blobs/", "/manifests/"):
        if marker in path:
            return path.split(marker)[0]
    return path.strip("/")


def _display(url: str) -> str:
    """A URL for logs: without its query (an upload's signed state)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _size_and_bytes(size: int) -> str:
    """C{100MiB (104857600 bytes)}, or C{1000000 bytes}."""
    shown = format_size(size)
    return shown if shown.endswith("bytes") else f"{shown} ({size} bytes)"


def _one_line(body: bytes) -> str:
    """
    A body that is no OCI error (a proxy's or CDN's HTML page) as one short
    line: its title if it has one (nginx's C{413 Request Entity Too Large}).
    """
    text = body[:4096].decode("utf-8", "replace")
    title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title is not None:
        text = title.group(1)
    return " ".join(text.split())[:200]


def _blobs_named(body: bytes) -> list[str]:
    """The config and layer digests of an image manifest (none for an index)."""
    try:
        document = json.loads(body)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    found: list[str] = []
    config = document.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        found.append(config["digest"])
    for layer in document.get("layers") or []:
        if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
            found.append(layer["digest"])
    return found
