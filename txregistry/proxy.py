"""
The pull-through cache's decisions: what is served from disk, what is asked
of the upstream, and what is kept.

 - Content addressed by digest never changes, so it is served from the cache
   whenever it is there, without asking the upstream.
 - A tag's answer (which digest it names, for the client's C{Accept}) is
   reused for C{tag_ttl}.  After that it is revalidated with a HEAD, which
   does not count against Docker Hub's pull limit; only if the digest changed
   is the manifest downloaded again.
 - A blob miss starts one L{BlobFill}, which every client that asks for the
   blob meanwhile follows.

This module knows nothing of HTTP requests: it returns answers that
L{txregistry.resource} writes out.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txregistry.errors import RegistryError
from txregistry.fill import BlobFill
from txregistry.httpclient import read_body
from txregistry.mirrors import (
    UPSTREAM_ERRORS,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamUnavailable,
)
from txregistry.reference import Digest, Tag
from txregistry.routing import Route
from txregistry.singleflight import SingleFlight
from txregistry.store import CachedBlob, CachedManifest, CacheStore, TagEntry
from txregistry.upstream import FetchedManifest, Upstream, UpstreamResponse

HIT = "HIT"
MISS = "MISS"

# What to ask for when a client sends no Accept header: every manifest type
# we pass through.  Without it distribution would convert to schema 1.
DEFAULT_ACCEPT = b", ".join(
    [
        b"application/vnd.oci.image.index.v1+json",
        b"application/vnd.oci.image.manifest.v1+json",
        b"application/vnd.docker.distribution.manifest.list.v2+json",
        b"application/vnd.docker.distribution.manifest.v2+json",
    ]
)


@dataclass(frozen=True)
class ManifestAnswer:
    """A manifest to send; C{body} is L{None} for a HEAD."""

    digest: str
    media_type: str
    size: int
    body: bytes | None
    cache: str


@dataclass(frozen=True)
class BlobHit:
    """A verified blob from the cache; its receiver must close the file."""

    blob: CachedBlob
    cache: str = HIT


@dataclass(frozen=True)
class BlobFilling:
    """
    A blob being downloaded, to be followed as it grows.  The answer holds a
    reference to the fill, which its receiver must release.
    """

    fill: BlobFill

    @property
    def cache(self) -> str:
        # A fill that has completed is verified and on our disk, waiting only
        # to be moved into the store: its bytes no longer come from upstream.
        return HIT if self.fill.is_complete() else MISS


@dataclass(frozen=True)
class BlobStream:
    """An upstream response to pipe straight through, uncached."""

    response: UpstreamResponse
    digest: Digest
    cache: str = MISS


@dataclass(frozen=True)
class BlobHead:
    """The answer to a HEAD that missed the cache."""

    size: int | None
    cache: str = MISS


BlobAnswer = BlobHit | BlobFilling | BlobStream | BlobHead


@dataclass(frozen=True)
class PassedThrough:
    """An upstream answer passed on as it is (tags/list, referrers)."""

    code: int
    headers: dict[str, str]
    body: bytes


def accept_key(accept: bytes) -> str:
    """
    The media types of an C{Accept} header, normalized, for use in a cache
    key: a tag can name a different manifest for a client that accepts
    indexes than for one that does not.
    """
    types = {
        part.split(";")[0].strip().lower()
        for part in accept.decode("latin-1").split(",")
        if part.strip()
    }
    return ",".join(sorted(types))


def not_found(route: Route, error: UpstreamNotFound) -> RegistryError:
    """The client's 404, with the upstream's code when it is a known one."""
    default = {"manifests": "MANIFEST_UNKNOWN", "blobs": "BLOB_UNKNOWN"}.get(
        route.kind.value, "NAME_UNKNOWN"
    )
    code = (
        error.code
        if error.code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN")
        else default
    )
    return RegistryError(404, code, f"{route.registry.name}/{route.describe()}: {error.message}")


def upstream_error(route: Route, error: Exception) -> RegistryError:
    """Turn an upstream outcome into the error the client sees."""
    if isinstance(error, UpstreamNotFound):
        return not_found(route, error)
    if isinstance(error, (UpstreamRefused, UpstreamUnavailable)):
        return error.as_registry_error()
    raise error


class PullThroughCache:
    """
    Answers pulls from the store when it can and from the upstream when it
    must, keeping what it fetches.
    """

    log = Logger()

    def __init__(
        self,
        store: CacheStore,
        upstreams: dict[str, Upstream],
        clock: IReactorTime,
        tag_ttl: float,
    ) -> None:
        self.store = store
        self._upstreams = upstreams
        self._clock = clock
        self._tag_ttl = tag_ttl
        self._fills: dict[Digest, BlobFill] = {}
        self._fill_starts: SingleFlight[Digest, BlobFill | None] = SingleFlight()

    def upstream(self, route: Route) -> Upstream:
        return self._upstreams[route.registry.name]

    # Manifests.

    async def manifest(self, route: Route, head: bool, accept: bytes) -> ManifestAnswer:
        accept = accept or DEFAULT_ACCEPT
        try:
            if isinstance(route.reference, Digest):
                return await self._manifest_by_digest(route, route.reference, head, accept)
            assert isinstance(route.reference, Tag)
            return await self._manifest_by_tag(route, route.reference, head, accept)
        except UPSTREAM_ERRORS as e:
            raise upstream_error(route, e) from None

    async def _manifest_by_digest(
        self, route: Route, digest: Digest, head: bool, accept: bytes
    ) -> ManifestAnswer:
        cached = await self.store.get_manifest(digest)
        if cached is not None:
            return _answer(digest, cached, head, HIT)
        if head:
            response = await self.upstream(route).request(
                b"HEAD",
                route.repository,
                f"manifests/{digest}",
                f"manifest {route.describe()}",
                {b"Accept": accept},
                by_digest=True,
            )
            return _head_answer(route, response, digest)
        fetched = await self._fetch_manifest(route, str(digest), accept, digest)
        return _answer(digest, _cached(fetched), head, MISS)

    async def _manifest_by_tag(
        self, route: Route, tag: Tag, head: bool, accept: bytes
    ) -> ManifestAnswer:
        key = f"{route.registry.name}/{route.repository}:{tag}#{accept_key(accept)}"
        entry = await self.store.get_tag(key)
        now = self._clock.seconds()
        if entry is not None and now - entry.checked_at >= self._tag_ttl:
            entry = await self._revalidate(route, tag, accept, key, entry)
        if entry is not None:
            return await self._answer_from_entry(route, entry, head, accept)

        what = f"manifest {route.describe()}"
        if head:
            response = await self.upstream(route).request(
                b"HEAD", route.repository, f"manifests/{tag}", what, {b"Accept": accept}
            )
            announced = response.header("Docker-Content-Digest")
            if announced:
                answer = _head_answer(route, response, None)
                await self.store.put_tag(
                    key, TagEntry(answer.digest, answer.media_type, answer.size, now)
                )
                return answer
            # Without a digest we cannot remember the answer: fetch it whole.
        fetched = await self._fetch_manifest(route, str(tag), accept, None)
        await self.store.put_tag(
            key, TagEntry(str(fetched.digest), fetched.media_type, len(fetched.body), now)
        )
        return _answer(fetched.digest, _cached(fetched), head, MISS)

    async def _revalidate(
        self, route: Route, tag: Tag, accept: bytes, key: str, entry: TagEntry
    ) -> TagEntry | None:
        """
        Ask the upstream, with a HEAD, whether an expired tag still names
        the same digest.  Returns the refreshed entry, or L{None} if the tag
        has moved.
        """
        response = await self.upstream(route).request(
            b"HEAD",
            route.repository,
            f"manifests/{tag}",
            f"manifest {route.describe()}",
            {b"Accept": accept},
        )
        if response.header("Docker-Content-Digest") != entry.digest:
            return None
        refreshed = TagEntry(entry.digest, entry.media_type, entry.size, self._clock.seconds())
        await self.store.put_tag(key, refreshed)
        return refreshed

    async def _answer_from_entry(
        self, route: Route, entry: TagEntry, head: bool, accept: bytes
    ) -> ManifestAnswer:
        if head:
            return ManifestAnswer(entry.digest, entry.media_type, entry.size, None, HIT)
        digest = Digest.parse(entry.digest)
        cached = await self.store.get_manifest(digest)
        if cached is not None:
            return _answer(digest, cached, head, HIT)
        # We know the digest but not the bytes (the tag was only HEADed):
        # fetch them by digest, so that they match what we said.
        fetched = await self._fetch_manifest(route, entry.digest, accept, digest)
        return _answer(digest, _cached(fetched), head, MISS)

    async def _fetch_manifest(
        self, route: Route, reference: str, accept: bytes, expected: Digest | None
    ) -> FetchedManifest:
        fetched = await self.upstream(route).manifest(
            route.repository, reference, accept, f"manifest {route.describe()}", expected
        )
        await self.store.put_manifest(fetched.digest, _cached(fetched))
        return fetched

    # Blobs.

    async def blob(self, route: Route, head: bool) -> BlobAnswer:
        digest = route.digest
        try:
            return await self._blob(route, digest, head)
        except UPSTREAM_ERRORS as e:
            raise upstream_error(route, e) from None

    async def _blob(self, route: Route, digest: Digest, head: bool) -> BlobAnswer:
        following = self._follow(digest)
        if following is not None:
            return following
        cached = await self.store.open_blob(digest)
        if cached is not None:
            return BlobHit(cached)
        # A download may have started while we looked in the store.
        following = self._follow(digest)
        if following is not None:
            return following
        if head:
            response = await self.upstream(route).request(
                b"HEAD",
                route.repository,
                f"blobs/{digest}",
                f"blob {route.describe()}",
                by_digest=True,
            )
            return BlobHead(response.content_length)

        mine: list[UpstreamResponse] = []

        async def start() -> BlobFill | None:
            response = await self._get_blob(route, digest)
            fill = self._start_fill(digest, response)
            if fill is None:
                mine.append(response)
            return fill

        started = await self._fill_starts.run(digest, start)
        if started is None:
            if mine:
                return BlobStream(mine[0], digest)
            # We joined a request whose response could not be cached and was
            # streamed to its own client: we need our own.
            return BlobStream(await self._get_blob(route, digest), digest)
        following = self._follow(digest)
        if following is not None:
            return following
        # The download ended before we could follow it: a small blob can
        # arrive, and fail its check, within the call that started it.
        failure = started.failure()
        if failure is not None:
            raise RegistryError.upstream_unavailable(
                route.registry.name, [(started.source, failure.getErrorMessage())]
            )
        cached = await self.store.open_blob(digest)
        if cached is not None:
            return BlobHit(cached, MISS)
        return BlobStream(await self._get_blob(route, digest), digest)

    def _follow(self, digest: Digest) -> BlobFilling | None:
        """
        Follow a download of C{digest} in progress.  Only a listed fill is
        handed out: we hold it, so its file is still open.
        """
        fill = self._fills.get(digest)
        return None if fill is None else BlobFilling(fill.acquire())

    async def _get_blob(self, route: Route, digest: Digest) -> UpstreamResponse:
        return await self.upstream(route).request(
            b"GET", route.repository, f"blobs/{digest}", f"blob {route.describe()}", by_digest=True
        )

    def _start_fill(self, digest: Digest, response: UpstreamResponse) -> BlobFill | None:
        """
        Start filling the cache from a blob response, or return L{None} if
        the blob cannot be cached and must be streamed through instead.
        """
        size = response.content_length
        if not self.store.available:
            return None
        if size is not None and size > self.store.size_limit:
            self.log.info(
                "{digest} ({size} bytes) is larger than the cache; streaming it uncached",
                digest=str(digest),
                size=size,
            )
            return None
        try:
            fd, path = self.store.new_temp_file(digest)
        except OSError as e:
            self.log.warn("cannot create a download file: {error}; streaming uncached", error=e)
            return None
        fill = BlobFill(digest, size, fd, path, response.mirror, self._clock)
        self._fills[digest] = fill
        fill.verified.addCallbacks(
            self._commit, self._forget, callbackArgs=(fill,), errbackArgs=(fill,)
        )
        fill.start(response)
        return fill

    def _commit(self, size: int, fill: BlobFill) -> None:
        def done(_: object) -> None:
            self._forget(None, fill)

        def failed(reason: object) -> None:
            self.log.error(
                "could not store {digest} in the cache: {reason}",
                digest=str(fill.digest),
                reason=reason,
            )
            fill.discard_file()

        self.store.commit_blob(fill.digest, fill.path, size).addErrback(failed).addBoth(done)

    def _forget(self, _: object, fill: BlobFill) -> None:
        """Stop handing out a finished fill: new requests go to the store."""
        self._fills.pop(fill.digest, None)
        fill.release()

    # Tags lists and referrers, passed through.

    async def passthrough(self, route: Route, path: str) -> PassedThrough:
        """
        Pass C{tags/list} and C{referrers} through to the upstream, uncached.
        C{path} is relative to the repository, query string included.
        """
        try:
            response = await self.upstream(route).request(
                b"GET", route.repository, path, f"{route.kind.value} of {route.repository}"
            )
        except UPSTREAM_ERRORS as e:
            raise upstream_error(route, e) from None
        try:
            body = await read_body(response.response, PASSTHROUGH_LIMIT)
        except Exception as e:
            raise RegistryError.upstream_unavailable(
                route.registry.name, [(response.mirror, f"reading the response failed: {e}")]
            ) from None
        headers = {}
        for name in ("Content-Type", "Link", "OCI-Filters-Applied"):
            value = response.header(name)
            if value is not None:
                headers[name] = value
        return PassedThrough(response.code, headers, body)


PASSTHROUGH_LIMIT = 16 << 20


def _cached(fetched: FetchedManifest) -> CachedManifest:
    return CachedManifest(fetched.media_type, fetched.body)


def _answer(digest: Digest, manifest: CachedManifest, head: bool, cache: str) -> ManifestAnswer:
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
