"""
The pull-through repository: what is served from storage, what is asked of
the upstream, and what is kept.

 - Content addressed by digest never changes, so it is served from storage
   whenever it is there, without asking the upstream.
 - A tag has one answer, shared by every client that accepts its media
   type, and follows the policy of L{txregistry.repository.tags}: trusted
   for C{tag_ttl}, revalidated with a HEAD, served C{STALE} when the
   upstream cannot answer, remembered as missing for C{negative_ttl}.  A
   client that does not accept it is answered as the upstream answers its
   own C{Accept}.
 - Concurrent requests for the same manifest share one lookup; concurrent
   requests for the same blob share one download
   (L{txregistry.repository.fills}).
"""

from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from txregistry.config import CacheConfig
from txregistry.oci.errors import RegistryError
from txregistry.oci.mediatypes import Accepted, upstream_accept
from txregistry.oci.reference import Digest, Tag
from txregistry.repository.fill import BlobFill, Resumer
from txregistry.repository.fills import BlobFills
from txregistry.repository.interface import (
    HIT,
    MISS,
    STALE,
    BlobAnswer,
    BlobHead,
    BlobHit,
    BlobStream,
    IRepository,
    Kind,
    Listing,
    ManifestAnswer,
    Route,
)
from txregistry.repository.segments import FetchRange
from txregistry.repository.singleflight import SingleFlight
from txregistry.repository.tags import (
    TAG_ACCEPT,
    MissingTags,
    can_serve_stale,
    migrate_tag_answers,
    refused_for_accept,
    tag_key,
)
from txregistry.storage.interface import IStorage, StoredManifest, TagEntry
from txregistry.upstream.client import FetchedManifest, Upstream, UpstreamResponse
from txregistry.upstream.errors import (
    UPSTREAM_ERRORS,
    UpstreamNotFound,
    UpstreamOffline,
    UpstreamRefused,
    UpstreamUnavailable,
)

LISTING_LIMIT = 16 << 20
_LISTING_HEADERS = ("Content-Type", "Link", "OCI-Filters-Applied")


def upstream_error(route: Route, error: Exception) -> RegistryError:
    """Turn an upstream outcome into the error the client sees."""
    if isinstance(error, UpstreamNotFound):
        default = {"manifests": "MANIFEST_UNKNOWN", "blobs": "BLOB_UNKNOWN"}.get(
            route.kind.value, "NAME_UNKNOWN"
        )
        known = ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN")
        code = error.code if error.code in known else default
        return RegistryError(
            404, code, f"{route.registry.name}/{route.describe()}: {error.message}"
        )
    if isinstance(error, UpstreamOffline):
        return error.as_registry_error(f"{route.describe()} is not in the cache")
    if isinstance(error, (UpstreamRefused, UpstreamUnavailable)):
        return error.as_registry_error()
    raise error


@implementer(IRepository)
class PullThroughCache:
    """
    Answers pulls from storage when it can and from the upstream when it
    must, keeping what it fetches.
    """

    log = Logger()

    def __init__(
        self,
        storage: IStorage,
        upstreams: dict[str, Upstream],
        clock: IReactorTime,
        config: CacheConfig,
    ) -> None:
        self.storage = storage
        self._upstreams = upstreams
        self._clock = clock
        self._config = config
        self._missing = MissingTags(config.negative_ttl)
        self._manifest_lookups: SingleFlight[tuple[str, ...], ManifestAnswer] = SingleFlight()
        self.fills = BlobFills(storage, clock, config, self.count_fetched)
        # Bytes of blobs and manifests received from upstream, for metrics.
        self.fetched_bytes = 0

    def count_fetched(self, size: int) -> None:
        self.fetched_bytes += size

    def upstream(self, route: Route) -> Upstream:
        return self._upstreams[route.registry.name]

    @property
    def joins(self) -> int:
        """Requests that shared another's upstream request."""
        return self._manifest_lookups.joins + self.fills.joins

    async def drain(self, timeout: float) -> None:
        await self.fills.drain(timeout)

    # Manifests.

    async def manifest(self, route: Route, head: bool, accept: bytes) -> ManifestAnswer:
        accepted = Accepted(accept)
        method = "HEAD" if head else "GET"
        where = (route.registry.name, route.repository, str(route.reference), method)
        try:
            if isinstance(route.reference, Digest):
                digest = route.reference
                return await self._manifest_lookups.run(
                    where, lambda: self._manifest_by_digest(route, digest, head, accepted)
                )
            assert isinstance(route.reference, Tag)
            tag = route.reference
            answer = await self._manifest_lookups.run(
                where, lambda: self._manifest_by_tag(route, tag, head)
            )
            if accepted.accepts(answer.media_type):
                return answer
            return await self._manifest_lookups.run(
                (*where, accepted.key()),
                lambda: self._negotiate(route, tag, head, accepted, answer),
            )
        except UPSTREAM_ERRORS as e:
            raise upstream_error(route, e) from None

    async def migrate_tag_answers(self) -> None:
        """Bring tag answers kept by an earlier version into the current layout."""
        await migrate_tag_answers(self.storage)

    async def _manifest_by_digest(
        self, route: Route, digest: Digest, head: bool, accepted: Accepted
    ) -> ManifestAnswer:
        stored = await self.storage.get_manifest(digest)
        if stored is not None:
            return _answer(digest, stored, head, HIT)
        # Content by digest is the same whatever the client accepts: ask for
        # every type, so that distribution does not refuse an OCI manifest
        # to a client that sent "*/*".
        accept = upstream_accept(*accepted.named_types)
        if head:
            response = await self._head_manifest(route, str(digest), accept, by_digest=True)
            return _head_answer(route, response, digest)
        fetched = await self._fetch_manifest(route, str(digest), accept, digest)
        return _answer(digest, _stored(fetched), head, MISS)

    async def _manifest_by_tag(self, route: Route, tag: Tag, head: bool) -> ManifestAnswer:
        """The tag's one answer, whatever the client accepts (see L{txregistry.repository.tags})."""
        key = tag_key(route, tag)
        entry = await self.storage.get_tag(key)
        now = self._clock.seconds()
        if entry is not None and now - entry.checked_at >= self._config.tag_ttl:
            try:
                refreshed = await self._revalidate(route, tag, key, entry)
            except UPSTREAM_ERRORS as e:
                if not can_serve_stale(e):
                    raise
                self.log.warn(
                    "serving stale {registry}/{what}: last confirmed {age:.0f}s ago,"
                    " and the upstream cannot say now ({reason})",
                    registry=route.registry.name,
                    what=route.describe(),
                    age=now - entry.checked_at,
                    reason=str(e),
                )
                return await self._answer_from_entry(route, entry, head, STALE)
            if refreshed is not None:
                return await self._answer_from_entry(route, refreshed, head, HIT)
        elif entry is not None:
            return await self._answer_from_entry(route, entry, head, HIT)

        self._missing.check(route, key, now)
        try:
            return await self._fetch_tag(route, tag, head, key, now)
        except UpstreamNotFound as e:
            if not refused_for_accept(e):
                self._missing.remember(key, now)
            raise

    async def _fetch_tag(
        self, route: Route, tag: Tag, head: bool, key: str, now: float
    ) -> ManifestAnswer:
        if head:
            response = await self._head_manifest(route, str(tag), TAG_ACCEPT)
            if response.header("Docker-Content-Digest"):
                answer = _head_answer(route, response, None)
                await self.storage.put_tag(
                    key, TagEntry(answer.digest, answer.media_type, answer.size, now)
                )
                return answer
            # Without a digest we cannot remember the answer: fetch it whole.
        fetched = await self._fetch_manifest(route, str(tag), TAG_ACCEPT, None)
        await self.storage.put_tag(
            key, TagEntry(str(fetched.digest), fetched.media_type, len(fetched.body), now)
        )
        return _answer(fetched.digest, _stored(fetched), head, MISS)

    async def _revalidate(
        self, route: Route, tag: Tag, key: str, entry: TagEntry
    ) -> TagEntry | None:
        """
        Ask the upstream, with a HEAD, whether an expired tag still names
        the same digest.  Returns the refreshed entry, or L{None} if the tag
        has moved.
        """
        response = await self._head_manifest(route, str(tag), TAG_ACCEPT)
        if response.header("Docker-Content-Digest") != entry.digest:
            return None
        refreshed = TagEntry(entry.digest, entry.media_type, entry.size, self._clock.seconds())
        await self.storage.put_tag(key, refreshed)
        return refreshed

    async def _answer_from_entry(
        self, route: Route, entry: TagEntry, head: bool, cache: str
    ) -> ManifestAnswer:
        if head:
            return ManifestAnswer(entry.digest, entry.media_type, entry.size, None, cache)
        digest = Digest.parse(entry.digest)
        stored = await self.storage.get_manifest(digest)
        if stored is not None:
            return _answer(digest, stored, head, cache)
        # We know the digest but not the bytes (the tag was only HEADed):
        # fetch them by digest, so that they match what we said.
        accept = upstream_accept(entry.media_type)
        fetched = await self._fetch_manifest(route, entry.digest, accept, digest)
        return _answer(digest, _stored(fetched), head, MISS)

    async def _negotiate(
        self, route: Route, tag: Tag, head: bool, accepted: Accepted, answer: ManifestAnswer
    ) -> ManifestAnswer:
        """
        The tag's answer is of a type the client does not accept: ask the
        upstream with the client's own C{Accept}, which may give another
        answer (distribution rewrites a manifest list into the manifest of
        linux/amd64 for a client that accepts no list).  That answer is
        not kept as the tag's; its manifest is kept by digest.
        """
        what = f"{route.registry.name}/{route.describe()}"
        self.log.info(
            "{what} is {media_type}, which the client's Accept ({accept}) does not include:"
            " asking the upstream with that Accept",
            what=what,
            media_type=answer.media_type,
            accept=accepted.describe(),
        )
        accept = accepted.header.encode("latin-1")
        try:
            if head:
                response = await self._head_manifest(route, str(tag), accept)
                if response.header("Docker-Content-Digest"):
                    return _head_answer(route, response, None)
                # Without a digest the answer would say nothing: fetch it whole.
            fetched = await self._fetch_manifest(route, str(tag), accept, None)
        except UpstreamNotFound:
            raise RegistryError.manifest_unknown(
                f"{what} is {answer.media_type}, which the request's Accept header"
                f" ({accepted.describe()}) does not include, and the upstream has nothing"
                f" else for it: accept {answer.media_type}, or pull {answer.digest}"
            ) from None
        except UpstreamOffline as e:
            raise e.as_registry_error(
                f"{route.describe()} is cached only as {answer.media_type}, which the"
                f" request's Accept header ({accepted.describe()}) does not include"
            ) from None
        return _answer(fetched.digest, _stored(fetched), head, MISS)

    async def _head_manifest(
        self, route: Route, reference: str, accept: bytes, by_digest: bool = False
    ) -> UpstreamResponse:
        return await self.upstream(route).head_manifest(
            route.repository,
            reference,
            accept,
            f"manifest {route.describe()}",
            by_digest,
            _from_peer(route),
        )

    async def _fetch_manifest(
        self, route: Route, reference: str, accept: bytes, expected: Digest | None
    ) -> FetchedManifest:
        fetched = await self.upstream(route).manifest(
            route.repository,
            reference,
            accept,
            f"manifest {route.describe()}",
            expected,
            _from_peer(route),
        )
        self.count_fetched(len(fetched.body))
        await self.storage.put_manifest(fetched.digest, _stored(fetched))
        return fetched

    # Blobs.

    async def blob(self, route: Route, head: bool) -> BlobAnswer:
        try:
            return await self._blob(route, route.digest, head)
        except UPSTREAM_ERRORS as e:
            raise upstream_error(route, e) from None

    async def _blob(self, route: Route, digest: Digest, head: bool) -> BlobAnswer:
        following = self.fills.follow(digest, joining=True)
        if following is not None:
            return following
        ended = self.fills.looking(digest)
        try:
            stored = await self.storage.open_blob(digest)
        finally:
            filled = ended()
        if stored is not None:
            return BlobHit(stored)
        # A download may have started while we looked in storage, or even
        # finished: then storage has it now.
        following = self.fills.follow(digest, joining=True)
        if following is not None:
            return following
        if filled:
            stored = await self.storage.open_blob(digest)
            if stored is not None:
                return BlobHit(stored)
        if head:
            response = await self.upstream(route).head_blob(
                route.repository, digest, f"blob {route.describe()}", _from_peer(route)
            )
            return BlobHead(response.content_length)

        mine: list[UpstreamResponse] = []

        async def start() -> BlobFill | None:
            response = await self._get_blob(route)
            fill = self.fills.start(
                route,
                response,
                self._resumer(route),
                self.upstream(route).content_failed,
                fetch_range=self._range_fetcher(route),
                mirrors=self.upstream(route).digest_mirrors,
            )
            if fill is None:
                mine.append(response)
            return fill

        started = await self.fills.start_once(digest, start)
        if started is None:
            if mine:
                return self._stream(route, mine[0])
            # We joined a request whose response could not be stored and was
            # streamed to its own client: we need our own.
            return self._stream(route, await self._get_blob(route))
        following = self.fills.follow(digest)
        if following is not None:
            return following
        # The download ended before we could follow it: a small blob can
        # arrive, and fail its check, within the call that started it.
        failure = started.failure()
        if failure is not None:
            raise RegistryError.upstream_unavailable(
                route.registry.name, [(started.source, failure.getErrorMessage())]
            )
        stored = await self.storage.open_blob(digest)
        if stored is not None:
            return BlobHit(stored, MISS)
        return self._stream(route, await self._get_blob(route))

    def _stream(self, route: Route, response: UpstreamResponse) -> BlobStream:
        return BlobStream(
            route.digest,
            response.content_length,
            response.response.deliverBody,
            self.count_fetched,
        )

    async def _get_blob(
        self, route: Route, offset: int = 0, start_with: str | None = None, end: int | None = None
    ) -> UpstreamResponse:
        return await self.upstream(route).get_blob(
            route.repository,
            route.digest,
            f"blob {route.describe()}",
            offset,
            start_with,
            _from_peer(route),
            end,
        )

    def _range_fetcher(self, route: Route) -> FetchRange:
        async def fetch_range(start: int, end: int, first: str | None) -> UpstreamResponse:
            return await self._get_blob(route, start, start_with=first, end=end)

        return fetch_range

    def _resumer(self, route: Route) -> Resumer:
        async def resume(offset: int, last_mirror: str) -> UpstreamResponse:
            return await self._get_blob(route, offset, start_with=last_mirror)

        return resume

    # Tags lists and referrers, passed through.

    async def listing(self, route: Route, query: list[tuple[str, str]]) -> Listing:
        """Pass C{tags/list} and C{referrers} through to the upstream, uncached."""
        path = "tags/list" if route.kind is Kind.TAGS else f"referrers/{route.digest}"
        if query:
            path += "?" + urlencode(query)
        try:
            response, body = await self.upstream(route).get_listing(
                route.repository,
                path,
                f"{route.kind.value} of {route.repository}",
                LISTING_LIMIT,
            )
        except UPSTREAM_ERRORS as e:
            raise upstream_error(route, e) from None
        headers = {}
        for name in _LISTING_HEADERS:
            value = response.header(name)
            if value is not None:
                headers[name] = value
        return Listing(response.code, headers, body)


def _from_peer(route: Route) -> bool:
    """Whether a fleet peer sent the request, which must not go to another peer."""
    return route.peer is not None


def _stored(fetched: FetchedManifest) -> StoredManifest:
    return StoredManifest(fetched.media_type, fetched.body)


def _answer(digest: Digest, manifest: StoredManifest, head: bool, cache: str) -> ManifestAnswer:
    return ManifestAnswer(
        str(digest), manifest.media_type, len(manifest.body), None if head else manifest.body, cache
    )


def _head_answer(
    route: Route, response: UpstreamResponse, expected: Digest | None
) -> ManifestAnswer:
    """A HEAD answer made of the upstream's headers."""
    announced = response.header("Docker-Content-Digest") or (str(expected) if expected else "")
    if expected is not None and announced != str(expected):
        raise RegistryError.upstream_unavailable(
            route.registry.name,
            [(response.mirror, f"HEAD answered digest {announced[:100]!r} for {expected}")],
        )
    return ManifestAnswer(
        announced,
        response.header("Content-Type") or "application/octet-stream",
        response.content_length or 0,
        None,
        MISS,
    )
