"""
Requests to a registry's upstream mirrors.

L{Upstream} sends one logical request ("the manifest of library/alpine:3.20")
to a registry's mirrors in order, authenticating as each one asks, and
reports the outcome as a response to stream or one of three errors:

 - L{UpstreamNotFound}: the upstream says the thing does not exist;
 - L{UpstreamRefused}: the upstream said 401, 403 or 429, which the client
   should see as it is;
 - L{UpstreamUnavailable}: no mirror gave an answer, with each one's reason.

Responses are raw: no content decoding (digests are over the exact bytes),
no cookies, and redirects to blob storage are followed without carrying the
C{Authorization} header to another host (Twisted's L{RedirectAgent} strips it
on cross-origin redirects).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import RedirectAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from txregistry import __version__
from txregistry.auth import (
    AuthError,
    Challenge,
    TokenFetcher,
    TokenKey,
    parse_www_authenticate,
    pull_scope,
    token_key,
)
from txregistry.config import MirrorConfig, RegistryConfig
from txregistry.errors import RegistryError
from txregistry.httpclient import BodyTooLarge, discard_body, header, read_body
from txregistry.reference import Digest

T = TypeVar("T")

USER_AGENT = f"txregistry/{__version__}".encode("ascii")
# The distribution spec lets registries refuse manifests over 4 MiB, and
# distribution does (maxManifestBodySize).
MAX_MANIFEST_SIZE = 4 << 20
MAX_ERROR_BODY = 1 << 16
_REFUSED_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}


class _MirrorFailed(Exception):
    """This mirror gave no usable answer; the next one may."""


class UpstreamNotFound(Exception):
    """The upstream says it has no such repository, manifest or blob."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UpstreamRefused(Exception):
    """The upstream refused with 401, 403 or 429; the client should see that."""

    def __init__(self, mirror: str, status: int, message: str, retry_after: str | None) -> None:
        super().__init__(f"{mirror} answered HTTP {status}: {message}")
        self.mirror = mirror
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def as_registry_error(self) -> RegistryError:
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        return RegistryError(
            self.status,
            _REFUSED_CODES.get(self.status, "DENIED"),
            f"upstream {self.mirror} refused the request: {self.message}",
            headers=headers,
        )


class UpstreamUnavailable(Exception):
    """No mirror answered; C{failures} holds each mirror and its reason."""

    def __init__(self, registry: str, failures: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{m}: {r}" for m, r in failures))
        self.registry = registry
        self.failures = list(failures)

    def as_registry_error(self) -> RegistryError:
        return RegistryError.upstream_unavailable(self.registry, self.failures)


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest's exact bytes, as checked against its digest."""

    mirror: str
    digest: Digest
    media_type: str
    body: bytes


def _checked_manifest(
    response: UpstreamResponse, body: bytes, expected: Digest | None
) -> FetchedManifest:
    announced = response.header("Docker-Content-Digest")
    if expected is None and announced:
        try:
            expected = Digest.parse(announced)
        except RegistryError:
            raise _MirrorFailed(f"invalid Docker-Content-Digest {announced[:100]!r}") from None
    digest = Digest.of(body, expected.algorithm if expected else "sha256")
    if expected is not None and digest != expected:
        raise _MirrorFailed(f"manifest content has digest {digest}, not {expected}")
    media_type = response.header("Content-Type") or _declared_media_type(body)
    return FetchedManifest(response.mirror, digest, media_type, body)


def _declared_media_type(body: bytes) -> str:
    """The C{mediaType} a manifest declares, for upstreams that send no Content-Type."""
    try:
        declared = json.loads(body).get("mediaType")
    except Exception:
        declared = None
    return declared if isinstance(declared, str) else "application/vnd.oci.image.manifest.v1+json"


@dataclass
class UpstreamResponse:
    """A successful upstream response whose body has not been read yet."""

    mirror: str
    response: IResponse
    method: bytes = b"GET"

    @property
    def code(self) -> int:
        return int(self.response.code)

    def header(self, name: str) -> str | None:
        return header(self.response, name)

    @property
    def content_length(self) -> int | None:
        """The body's length, or the length a GET would have for a HEAD."""
        if self.method == b"HEAD":
            # Twisted reports length 0 for every HEAD response.
            value = self.header("Content-Length")
            return int(value) if value is not None and value.isdigit() else None
        length = self.response.length
        return length if isinstance(length, int) else None


def _error_message(body: bytes) -> tuple[str | None, str]:
    """The code and message of an OCI error body, if it is one."""
    try:
        document: Any = json.loads(body)
        error = document["errors"][0]
        return str(error.get("code")), str(error.get("message", ""))[:500]
    except Exception:
        return None, body[:200].decode("utf-8", "replace").strip()


class Upstream:
    """
    The upstream side of one configured registry.

    @param agent: sends the HTTP requests; its endpoints decide how hosts
        are reached.
    """

    log = Logger()

    def __init__(self, registry: RegistryConfig, agent: IAgent, clock: IReactorTime) -> None:
        self.registry = registry
        self._agent = RedirectAgent(agent, redirectLimit=5)
        self._tokens = TokenFetcher(self._agent, clock, registry.name)
        # The last Bearer challenge of each mirror, so that later requests can
        # fetch a token before asking instead of after a 401.
        self._challenges: dict[str, Challenge] = {}

    async def request(
        self,
        method: bytes,
        repository: str,
        path: str,
        what: str,
        headers: dict[bytes, bytes] | None = None,
    ) -> UpstreamResponse:
        """
        Ask the mirrors, in order, for C{/v2/<repository>/<path>}.

        @param what: says what is asked for, in logs and errors.
        @raise UpstreamNotFound: the upstream says it does not exist.
        @raise UpstreamRefused: the upstream refused (401, 403, 429).
        @raise UpstreamUnavailable: every mirror failed.
        """

        async def attempt(mirror: MirrorConfig) -> UpstreamResponse:
            return await self._ask(mirror, method, repository, path, headers or {})

        return await self._across_mirrors(what, attempt)

    async def manifest(
        self,
        repository: str,
        reference: str,
        accept: bytes,
        what: str,
        expected: Digest | None = None,
    ) -> FetchedManifest:
        """
        GET a manifest and check it: against C{expected} when it was asked
        for by digest, otherwise against the upstream's
        C{Docker-Content-Digest}.  A mirror whose answer fails the check
        counts as a failed mirror.
        """

        async def attempt(mirror: MirrorConfig) -> FetchedManifest:
            response = await self._ask(
                mirror, b"GET", repository, f"manifests/{reference}", {b"Accept": accept}
            )
            try:
                body = await read_body(response.response, MAX_MANIFEST_SIZE)
            except BodyTooLarge:
                raise _MirrorFailed(f"manifest larger than {MAX_MANIFEST_SIZE} bytes") from None
            except Exception as e:
                raise _MirrorFailed(
                    f"reading the manifest failed: {_describe_failure(e)}"
                ) from None
            return _checked_manifest(response, body, expected)

        return await self._across_mirrors(what, attempt)

    async def _across_mirrors(
        self, what: str, attempt: Callable[[MirrorConfig], Awaitable[T]]
    ) -> T:
        failures: list[tuple[str, str]] = []
        for mirror in self.registry.mirrors:
            try:
                return await attempt(mirror)
            except _MirrorFailed as e:
                self.log.warn(
                    "Mirror request failed: {mirror} {what}: {reason}",
                    mirror=mirror.url,
                    what=what,
                    reason=str(e),
                )
                failures.append((mirror.url, str(e)))
        self.log.error(
            "All mirrors failed for {registry} {what}: {failures}",
            registry=self.registry.name,
            what=what,
            failures="; ".join(f"{m}: {r}" for m, r in failures),
        )
        raise UpstreamUnavailable(self.registry.name, failures)

    async def _ask(
        self,
        mirror: MirrorConfig,
        method: bytes,
        repository: str,
        path: str,
        extra_headers: dict[bytes, bytes],
    ) -> UpstreamResponse:
        url = f"{mirror.url}/v2/{repository}/{path}".encode("ascii")
        scope = pull_scope(repository)
        key = self._known_token_key(mirror, scope)
        response = await self._send(method, url, extra_headers, key)
        if response.code == 401:
            # Once with a fresh token: the first time we meet this scope, or
            # when a cached token was revoked early.
            challenge = self._bearer_challenge(response)
            if challenge is not None:
                discard_body(response)
                self._challenges[mirror.url] = challenge
                if key is not None:
                    self._tokens.discard(key)
                key = token_key(challenge, scope)
                response = await self._send(method, url, extra_headers, key)
        return await self._classify(mirror, method, response)

    def _known_token_key(self, mirror: MirrorConfig, scope: str) -> TokenKey | None:
        challenge = self._challenges.get(mirror.url)
        return None if challenge is None else token_key(challenge, scope)

    def _bearer_challenge(self, response: IResponse) -> Challenge | None:
        values = [
            v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])
        ]
        for challenge in parse_www_authenticate(values):
            if challenge.scheme == "bearer" and token_key(challenge, "") is not None:
                return challenge
        return None

    async def _send(
        self,
        method: bytes,
        url: bytes,
        extra_headers: dict[bytes, bytes],
        key: TokenKey | None,
    ) -> IResponse:
        headers = Headers({b"User-Agent": [USER_AGENT]})
        for name, value in extra_headers.items():
            headers.setRawHeaders(name, [value])
        if key is not None:
            try:
                token = await self._tokens.token(key)
            except AuthError as e:
                raise _MirrorFailed(str(e)) from None
            headers.setRawHeaders(b"Authorization", [b"Bearer " + token.encode("ascii")])
        try:
            response: IResponse = await self._agent.request(method, url, headers)
            return response
        except Exception as e:
            raise _MirrorFailed(_describe_failure(e)) from None

    async def _classify(
        self, mirror: MirrorConfig, method: bytes, response: IResponse
    ) -> UpstreamResponse:
        code = response.code
        if 200 <= code < 300:
            return UpstreamResponse(mirror.url, response, method)
        body = b"" if method == b"HEAD" else await _error_body(response)
        error_code, message = _error_message(body)
        if code == 404:
            raise UpstreamNotFound(error_code, message or "not found")
        if code in _REFUSED_CODES:
            raise UpstreamRefused(
                mirror.url, code, message or f"HTTP {code}", header(response, "Retry-After")
            )
        raise _MirrorFailed(f"HTTP {code}" + (f": {message}" if message else ""))


async def _error_body(response: IResponse) -> bytes:
    try:
        return await read_body(response, MAX_ERROR_BODY)
    except Exception:
        return b""


def _describe_failure(error: Exception) -> str:
    """A one-line reason for a failed request, without a traceback."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        # ResponseFailed / ResponseNeverReceived wrap the real failures.
        return "; ".join(r.getErrorMessage() for r in reasons)
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
