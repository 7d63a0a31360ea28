"""
Requests to a registry's upstream mirrors.

L{Upstream} sends one logical request ("the manifest of library/alpine:3.20")
to a registry's mirrors in the order L{MirrorSet} gives, authenticating as
each one asks, and reports the outcome as a response to stream, or as one of
the errors of L{txregistry.upstream.mirrors}.

Responses are raw: no content decoding (digests are over the exact bytes),
no cookies, and redirects to blob storage are followed without carrying the
C{Authorization} header to another host (Twisted's L{RedirectAgent} strips it
on cross-origin redirects).

Each mirror is sent its own credentials if it has some, else the
registry's, which go only to mirrors that may resolve tags, never to a
digest-only third-party mirror.  Docker Hub's hosts get them only through
its token service: Basic auth is never sent to its registry API.  That is
decided by the mirror's host, not the registry's name, so that a company's
registry mirroring C{docker.io} gets the Basic auth it asks for.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import RedirectAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from txregistry import __version__
from txregistry.config import MirrorConfig, RegistryConfig
from txregistry.oci.errors import RegistryError, error_code_and_message
from txregistry.oci.mediatypes import OCI_MANIFEST
from txregistry.oci.reference import Digest
from txregistry.upstream.auth import (
    AuthError,
    Challenge,
    TokenFetcher,
    basic_authorization,
    parse_www_authenticate,
    pull_scope,
    token_key,
)
from txregistry.upstream.bodies import (
    BodyTooLarge,
    TimedOut,
    describe_failure,
    discard_body,
    header,
    read_body,
    within,
)
from txregistry.upstream.errors import UpstreamOffline, UpstreamRefused, UpstreamUnavailable
from txregistry.upstream.mirrors import MirrorSet, MirrorState, Outcome, conclude
from txregistry.upstream.peers import PEER_HEADER, Fleet
from txregistry.upstream.transport import registry_http_client

T = TypeVar("T")

USER_AGENT = f"txregistry/{__version__}".encode("ascii")
# The distribution spec lets registries refuse manifests over 4 MiB, and
# distribution does (maxManifestBodySize).
MAX_MANIFEST_SIZE = 4 << 20
MAX_ERROR_BODY = 1 << 16


class _MirrorFailed(Exception):
    """This mirror gave no usable answer; the next one may."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


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
    """
    Check a manifest against the digest asked for, or else the one the
    upstream announced; a mismatch makes the mirror a failed one.
    """
    announced = response.header("Docker-Content-Digest")
    if expected is None and announced:
        try:
            expected = Digest.parse(announced)
        except RegistryError:
            raise _failed(
                response.mirror, f"invalid Docker-Content-Digest {announced[:100]!r}"
            ) from None
    digest = Digest.of(body, expected.algorithm if expected else "sha256")
    if expected is not None and digest != expected:
        raise _failed(response.mirror, f"manifest content has digest {digest}, not {expected}")
    media_type = response.header("Content-Type") or _declared_media_type(body)
    return FetchedManifest(response.mirror, digest, media_type, body)


def _declared_media_type(body: bytes) -> str:
    """The C{mediaType} a manifest declares, for upstreams that send no Content-Type."""
    try:
        declared = json.loads(body).get("mediaType")
    except Exception:
        declared = None
    return declared if isinstance(declared, str) else OCI_MANIFEST


def _failed(mirror: str, reason: str) -> _MirrorFailed:
    return _MirrorFailed(Outcome(mirror, reason))


class Upstream:
    """
    The upstream side of one configured registry.

    @param agent: sends the HTTP requests; its endpoints decide how hosts
        are reached (see L{txregistry.upstream.endpoints}).
    @param fleet: this node's peers, and C{peer_agent} the agent that
        reaches them (directly, never through the registry's proxy).
    """

    log = Logger()

    def __init__(
        self,
        registry: RegistryConfig,
        agent: IAgent,
        clock: IReactorTime,
        fleet: Fleet | None = None,
        peer_agent: IAgent | None = None,
    ) -> None:
        self.registry = registry
        self.fleet = fleet
        self._peer_http = registry_http_client(peer_agent) if peer_agent is not None else None
        self.mirrors = MirrorSet(registry, clock)
        # In offline mode no upstream is asked; an admin request can switch it.
        self.offline = registry.offline
        # The last "ratelimit-remaining" Docker Hub sent, for metrics.
        self.ratelimit_remaining: int | None = None
        self._clock = clock
        self._timeout = registry.upstream.response_timeout
        # Registry requests go through treq; redirects to blob storage are
        # followed without carrying Authorization to another host.
        self._http = registry_http_client(agent)
        self._tokens = TokenFetcher(
            RedirectAgent(agent, redirectLimit=5),
            clock,
            registry.name,
            self._timeout,
        )
        # The last challenge of each mirror, so that later requests can
        # authenticate from the start instead of after a 401.
        self._challenges: dict[str, Challenge] = {}

    async def request(
        self,
        method: bytes,
        repository: str,
        path: str,
        what: str,
        headers: dict[bytes, bytes] | None = None,
        by_digest: bool = False,
        start_with: str | None = None,
        digest: Digest | None = None,
        from_peer: bool = False,
    ) -> UpstreamResponse:
        """
        Ask the mirrors, in order, for C{/v2/<repository>/<path>}.

        @param what: says what is asked for, in logs and errors.
        @param by_digest: whether the content asked for is addressed by a
            digest that will be checked, so that digest-only mirrors may
            be asked too.
        @param start_with: the URL of a mirror to ask first.
        @param digest: the digest of the content asked for, by which fleet
            peers are asked first, unless C{from_peer}: the request came
            from a peer, and is never passed on to another.
        @raise UpstreamNotFound: the upstream says it does not exist.
        @raise UpstreamRefused: every mirror refused (401, 403, 429).
        @raise UpstreamUnavailable: no mirror gave a usable answer.
        """

        async def attempt(mirror: MirrorConfig) -> UpstreamResponse:
            return await self._ask(mirror, method, repository, path, headers or {})

        return await self._across_mirrors(
            what, attempt, by_digest, start_with, None if from_peer else digest
        )

    async def manifest(
        self,
        repository: str,
        reference: str,
        accept: bytes,
        what: str,
        expected: Digest | None = None,
        from_peer: bool = False,
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
                raise _failed(
                    mirror.url, f"manifest larger than {MAX_MANIFEST_SIZE} bytes"
                ) from None
            except Exception as e:
                raise _failed(
                    mirror.url, f"reading the manifest failed: {describe_failure(e)}"
                ) from None
            return _checked_manifest(response, body, expected)

        return await self._across_mirrors(
            what, attempt, expected is not None, None, None if from_peer else expected
        )

    async def head_manifest(
        self,
        repository: str,
        reference: str,
        accept: bytes,
        what: str,
        by_digest: bool = False,
        from_peer: bool = False,
    ) -> UpstreamResponse:
        """HEAD a manifest: its digest, type and size, without its body."""
        return await self.request(
            b"HEAD",
            repository,
            f"manifests/{reference}",
            what,
            {b"Accept": accept},
            by_digest=by_digest,
            digest=Digest.parse(reference) if by_digest else None,
            from_peer=from_peer,
        )

    async def head_blob(
        self, repository: str, digest: Digest, what: str, from_peer: bool = False
    ) -> UpstreamResponse:
        return await self.request(
            b"HEAD",
            repository,
            f"blobs/{digest}",
            what,
            by_digest=True,
            digest=digest,
            from_peer=from_peer,
        )

    async def get_blob(
        self,
        repository: str,
        digest: Digest,
        what: str,
        offset: int = 0,
        start_with: str | None = None,
        from_peer: bool = False,
        end: int | None = None,
    ) -> UpstreamResponse:
        """
        GET a blob, or the rest of it from byte C{offset}, or with C{end}
        the bytes from C{offset} up to (not including) C{end}: a body to be
        streamed.
        """
        last = "" if end is None else str(end - 1)
        headers = {b"Range": f"bytes={offset}-{last}".encode()} if offset or end else None
        span = f" bytes {offset}-{last}" if end is not None else ""
        return await self.request(
            b"GET",
            repository,
            f"blobs/{digest}",
            what + (span or (f" from byte {offset}" if offset else "")),
            headers,
            by_digest=True,
            start_with=start_with,
            digest=digest,
            from_peer=from_peer,
        )

    def digest_mirrors(self) -> list[str]:
        """The URLs of the mirrors content by digest may come from, those not backing off first."""
        return [state.mirror.url for state in self.mirrors.to_try(by_digest=True)]

    async def get_listing(
        self, repository: str, path: str, what: str, limit: int
    ) -> tuple[UpstreamResponse, bytes]:
        """
        GET a small answer whole (C{tags/list}, C{referrers}): C{path} is
        relative to the repository, query string included.
        """
        response = await self.request(b"GET", repository, path, what)
        try:
            return response, await read_body(response.response, limit)
        except Exception as e:
            raise UpstreamUnavailable(
                self.registry.name, [(response.mirror, f"reading the response failed: {e}")]
            ) from None

    def describe(self) -> dict[str, Any]:
        """
        This registry's upstream state for C{/health}: no secrets.  Its
        C{status} is C{unavailable} when no mirror that resolves tags is
        usable (see L{MirrorSet.usable}), so that a monitor sees a dead
        upstream before users do; C{offline} when an admin chose so.
        """
        description: dict[str, Any] = {
            "status": self.status(),
            "offline": self.offline,
            "mirrors": self.mirrors.describe(),
        }
        if description["status"] == "unavailable":
            description["reason"] = (
                "no usable mirror: every mirror that resolves tags is backing off or has"
                " failed repeatedly since its last answer (see each mirror's last_error);"
                " cached content is still served, new pulls by tag fail"
            )
        if self.registry.credentials is not None:
            description["user"] = self.registry.credentials.username
        return description

    def status(self) -> str:
        """C{ok}, C{offline} (an admin's choice) or C{unavailable} (no usable mirror)."""
        if self.offline:
            return "offline"
        return "ok" if self.mirrors.usable() else "unavailable"

    def content_failed(self, source: str, reason: str) -> None:
        """A blob from C{source} failed its digest check after it was streamed."""
        if self.fleet is not None:
            self.fleet.content_failed(source, reason)

    def _peers_to_ask(self, digest: Digest | None) -> list[MirrorState]:
        if self.fleet is None or digest is None or self._peer_http is None:
            return []
        return self.fleet.to_ask(digest)

    async def _across_mirrors(
        self,
        what: str,
        attempt: Callable[[MirrorConfig], Awaitable[T]],
        by_digest: bool,
        start_with: str | None = None,
        digest: Digest | None = None,
    ) -> T:
        if self.offline:
            raise UpstreamOffline(self.registry.name)
        for state in self._peers_to_ask(digest):
            assert self.fleet is not None
            try:
                peer_result = await attempt(state.mirror)
            except _MirrorFailed as e:
                self.fleet.record(state, e.outcome)
                self.log.warn(
                    "Peer request failed: {peer} {what}: {reason}; asking the next peer"
                    " or the upstream",
                    peer=state.mirror.url,
                    what=what,
                    reason=e.outcome.reason,
                )
                continue
            self.fleet.record(state, None)
            return peer_result
        outcomes: list[Outcome] = []
        for state in self.mirrors.to_try(by_digest, start_with):
            try:
                result = await attempt(state.mirror)
            except _MirrorFailed as e:
                self.mirrors.record(state, e.outcome)
                self.log.warn(
                    "Mirror request failed: {mirror} {what}: {reason}",
                    mirror=state.mirror.url,
                    what=what,
                    reason=e.outcome.reason,
                )
                outcomes.append(e.outcome)
                continue
            self.mirrors.record(state, None)
            return result
        error = conclude(self.registry.name, outcomes)
        if isinstance(error, (UpstreamUnavailable, UpstreamRefused)):
            self.log.error(
                "All mirrors failed for {registry} {what}: {failures}",
                registry=self.registry.name,
                what=what,
                failures="; ".join(f"{o.mirror}: {o.reason}" for o in outcomes),
            )
        raise error

    async def _ask(
        self,
        mirror: MirrorConfig,
        method: bytes,
        repository: str,
        path: str,
        extra_headers: dict[bytes, bytes],
    ) -> UpstreamResponse:
        if self.fleet is not None and self.fleet.is_peer(mirror.url):
            return await self._ask_peer(mirror, method, repository, path, extra_headers)
        url = f"{mirror.url}/v2/{repository}/{path}".encode("ascii")
        scope = pull_scope(repository)
        challenge = self._challenges.get(mirror.url)
        authorization = None
        if challenge is not None:
            authorization = await self._answer(mirror, challenge, scope, fresh=False)
        response = await self._send(mirror, method, url, extra_headers, authorization)
        if response.code == 401:
            challenge = self._challenge_to_answer(mirror, response)
            if challenge is not None:
                # Once more, with fresh credentials: the first time we meet
                # this mirror or scope, or when a cached token was revoked.
                discard_body(response)
                self._challenges[mirror.url] = challenge
                authorization = await self._answer(mirror, challenge, scope, fresh=True)
                response = await self._send(mirror, method, url, extra_headers, authorization)
        return await self._classify(mirror, method, response)

    async def _ask_peer(
        self,
        peer: MirrorConfig,
        method: bytes,
        repository: str,
        path: str,
        extra_headers: dict[bytes, bytes],
    ) -> UpstreamResponse:
        """
        Ask a fleet peer, by the registry's name as the first path
        component (every node configures the same registries), marked as a
        peer request so that it is not passed on, and without credentials.
        """
        assert self.fleet is not None and self._peer_http is not None
        url = f"{peer.url}/v2/{self.registry.name}/{repository}/{path}".encode("ascii")
        headers = {**extra_headers, PEER_HEADER: self.fleet.self_url.encode("ascii")}
        response = await self._send(peer, method, url, headers, None, self._peer_http)
        return await self._classify(peer, method, response)

    def _challenge_to_answer(self, mirror: MirrorConfig, response: IResponse) -> Challenge | None:
        """The challenge of a 401 we can answer: Bearer, else Basic if we may."""
        values = [
            v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])
        ]
        challenges = parse_www_authenticate(values)
        for challenge in challenges:
            if challenge.scheme == "bearer" and token_key(challenge, "") is not None:
                return challenge
        for challenge in challenges:
            if (
                challenge.scheme == "basic"
                and self.registry.credentials_for(mirror) is not None
                and not mirror.is_docker_hub
                and self._challenges.get(mirror.url) != challenge
            ):
                return challenge
        return None

    async def _answer(
        self, mirror: MirrorConfig, challenge: Challenge, scope: str, fresh: bool
    ) -> bytes | None:
        """The C{Authorization} for a mirror that challenged us so."""
        credentials = self.registry.credentials_for(mirror)
        if challenge.scheme == "basic":
            assert credentials is not None
            return basic_authorization(credentials)
        key = token_key(challenge, scope, credentials)
        assert key is not None
        if fresh:
            self._tokens.discard(key)
        try:
            token = await self._tokens.token(key)
        except AuthError as e:
            raise _MirrorFailed(
                Outcome(mirror.url, str(e), status=e.status, message=str(e))
            ) from None
        return b"Bearer " + token.encode("ascii")

    async def _send(
        self,
        mirror: MirrorConfig,
        method: bytes,
        url: bytes,
        extra_headers: dict[bytes, bytes],
        authorization: bytes | None,
        http: HTTPClient | None = None,
    ) -> IResponse:
        headers = Headers({b"User-Agent": [USER_AGENT]})
        for name, value in extra_headers.items():
            headers.setRawHeaders(name, [value])
        if authorization is not None:
            headers.setRawHeaders(b"Authorization", [authorization])
        try:
            sent = (http or self._http).request(
                method.decode("ascii"), url, headers=headers, unbuffered=True
            )
            response = await within(self._timeout, self._clock, sent)
            return response
        except TimedOut:
            raise _failed(mirror.url, f"no response within {self._timeout:g}s") from None
        except Exception as e:
            raise _failed(mirror.url, describe_failure(e)) from None

    async def _classify(
        self, mirror: MirrorConfig, method: bytes, response: IResponse
    ) -> UpstreamResponse:
        code = response.code
        remaining = header(response, "ratelimit-remaining")
        if remaining is not None and remaining.split(";")[0].strip().isdigit():
            self.ratelimit_remaining = int(remaining.split(";")[0])
        if 200 <= code < 300:
            return UpstreamResponse(mirror.url, response, method)
        body = b"" if method == b"HEAD" else await _error_body(response)
        error_code, message = error_code_and_message(body)
        reason = f"HTTP {code}" + (f": {message}" if message else "")
        raise _MirrorFailed(
            Outcome(
                mirror.url,
                reason,
                status=code,
                code=error_code,
                message=message,
                retry_after=header(response, "Retry-After"),
            )
        )


async def _error_body(response: IResponse) -> bytes:
    try:
        return await read_body(response, MAX_ERROR_BODY)
    except Exception:
        return b""
