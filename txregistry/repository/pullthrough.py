"""
The pull-through cache's decisions: what is served from disk, what is asked
of the upstream, and what is kept.

 - Content addressed by digest never changes, so it is served from the cache
   whenever it is there, without asking the upstream.
 - A tag's answer (which digest it names, for the client's C{Accept}) is
   reused for C{tag_ttl}.  After that it is revalidated with a HEAD, which
   does not count against Docker Hub's pull limit; only if the digest changed
   is the manifest downloaded again.  If the upstream cannot answer (every
   mirror failed or rate-limited us, or the registry is offline), the cached
   answer is served as C{STALE}.
 - A tag the upstream says does not exist is remembered as missing for
   C{negative_ttl}.
 - Concurrent requests for the same manifest share one lookup; concurrent
   requests for the same blob share one download (a L{BlobFill}), which
   each follows at its own pace.

This module knows nothing of HTTP requests: it returns answers that
L{txregistry.http.resource} writes out.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txregistry.config import CacheConfig
from txregistry.http.routing import Route
from txregistry.oci.errors import RegistryError
from txregistry.oci.reference import Digest, Tag
from txregistry.repository.fill import BlobFill, FillAbandoned, FillPolicy, Resumer
from txregistry.repository.singleflight import SingleFlight
from txregistry.storage.disk import CachedBlob, CachedManifest, CacheStore, TagEntry
from txregistry.storage.staging import InlineSpool, SpoolFactory
from txregistry.upstream.bodies import TimedOut, read_body, within
from txregistry.upstream.client import FetchedManifest, Upstream, UpstreamResponse
from txregistry.upstream.mirrors import (
    UPSTREAM_ERRORS,
    UpstreamNotFound,
    UpstreamOffline,
    UpstreamRefused,
    UpstreamUnavailable,
)

HIT = "HIT"
MISS = "MISS"
STALE = "STALE"

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
PASSTHROUGH_LIMIT = 16 << 20
# Past this many remembered missing tags, expired ones are forgotten.
_MISSING_PRUNE_AT = 4096


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


def _can_serve_stale(error: Exception) -> bool:
    """Whether an upstream failure lets an expired tag be served from the cache."""
    if isinstance(error, UpstreamRefused):
        return error.status == 429
    return isinstance(error, UpstreamUnavailable)


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
        config: CacheConfig,
        spool: SpoolFactory = InlineSpool,
    ) -> None:
        """
        @param spool: how downloads are written and hashed: on threads of
            their own in the service, inline in tests that drive the
            reactor by hand.
        """
        self.store = store
        self._spool = spool
        self._upstreams = upstreams
        self._clock = clock
        self._config = config
        self._fills: dict[Digest, BlobFill] = {}
        self._fill_starts: SingleFlight[Digest, BlobFill | None] = SingleFlight()
        self._manifest_lookups: SingleFlight[tuple[str, ...], ManifestAnswer] = SingleFlight()
        self._missing: dict[str, float] = {}
        self._followers = 0
        # Bytes of blobs and manifests received from upstream, for metrics.
        self.fetched_bytes = 0

    def count_fetched(self, size: int) -> None:
        self.fetched_bytes += size

    def upstream(self, route: Route) -> Upstream:
        return self._upstreams[route.registry.name]

    @property
    def fills_in_flight(self) -> int:
        return len(self._fills)

    @property
    def joins(self) -> int:
        """Requests that shared another's upstream request."""
        return self._fill_starts.joins + self._manifest_lookups.joins + self._followers

    # Manifests.

    async def manifest(self, route: Route, head: bool, accept: bytes) -> ManifestAnswer:
        accept = accept or DEFAULT_ACCEPT
        lookup = (
            route.registry.name,
            route.repository,
            str(route.reference),
            accept_key(accept),
            "HEAD" if head else "GET",
        )
        try:
            return await self._manifest_lookups.run(
                lookup, lambda: self._manifest(route, head, accept)
            )
        except UPSTREAM_ERRORS as e:
            raise upstream_error(route, e) from None

    async def _manifest(self, route: Route, head: bool, accept: bytes) -> ManifestAnswer:
        if isinstance(route.reference, Digest):
            return await self._manifest_by_digest(route, route.reference, head, accept)
        assert isinstance(route.reference, Tag)
        return await self._manifest_by_tag(route, route.reference, head, accept)

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
        if entry is not None and now - entry.checked_at >= self._config.tag_ttl:
            try:
                refreshed = await self._revalidate(route, tag, accept, key, entry)
            except UPSTREAM_ERRORS as e:
                if not _can_serve_stale(e):
                    raise
                self.log.warn(
                    "serving stale {registry}/{what}: last confirmed {age:.0f}s ago,"
                    " and the upstream cannot say now ({reason})",
                    registry=route.registry.name,
                    what=route.describe(),
                    age=now - entry.checked_at,
                    reason=str(e),
                )
                return await self._answer_from_entry(route, entry, head, accept, STALE)
            if refreshed is not None:
                return await self._answer_from_entry(route, refreshed, head, accept, HIT)
        elif entry is not None:
            return await self._answer_from_entry(route, entry, head, accept, HIT)

        self._check_not_missing(route, key, now)
        try:
            return await self._fetch_tag(route, tag, head, accept, key, now)
        except UpstreamNotFound:
            self._remember_missing(key, now)
            raise

    async def _fetch_tag(
        self, route: Route, tag: Tag, head: bool, accept: bytes, key: str, now: float
    ) -> ManifestAnswer:
        if head:
            response = await self.upstream(route).request(
                b"HEAD",
                route.repository,
                f"manifests/{tag}",
                f"manifest {route.describe()}",
                {b"Accept": accept},
            )
            if response.header("Docker-Content-Digest"):
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

    def _check_not_missing(self, route: Route, key: str, now: float) -> None:
        until = self._missing.get(key)
        if until is not None and now < until:
            raise RegistryError.manifest_unknown(
                f"{route.registry.name}/{route.describe()}: manifest unknown"
                f" (the upstream said so {self._config.negative_ttl - (until - now):.0f}s ago)"
            )

    def _remember_missing(self, key: str, now: float) -> None:
        if self._config.negative_ttl <= 0:
            return
        if len(self._missing) >= _MISSING_PRUNE_AT:
            self._missing = {k: t for k, t in self._missing.items() if t > now}
        self._missing[key] = now + self._config.negative_ttl

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
        self, route: Route, entry: TagEntry, head: bool, accept: bytes, cache: str
    ) -> ManifestAnswer:
        if head:
            return ManifestAnswer(entry.digest, entry.media_type, entry.size, None, cache)
        digest = Digest.parse(entry.digest)
        cached = await self.store.get_manifest(digest)
        if cached is not None:
            return _answer(digest, cached, head, cache)
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
        self.count_fetched(len(fetched.body))
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
        following = self._follow(digest, joining=True)
        if following is not None:
            return following
        cached = await self.store.open_blob(digest)
        if cached is not None:
            return BlobHit(cached)
        # A download may have started while we looked in the store.
        following = self._follow(digest, joining=True)
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
            fill = self._start_fill(route, digest, response)
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

    def _follow(self, digest: Digest, joining: bool = False) -> BlobFilling | None:
        """
        Follow a download of C{digest} in progress.  Only a listed fill is
        handed out: we hold it, so its file is still open.  C{joining} says
        the request is not the one that started the download.
        """
        fill = self._fills.get(digest)
        if fill is None:
            return None
        if joining:
            self._followers += 1
        return BlobFilling(fill.acquire())

    async def _get_blob(
        self, route: Route, digest: Digest, offset: int = 0, start_with: str | None = None
    ) -> UpstreamResponse:
        headers = {b"Range": f"bytes={offset}-".encode()} if offset else None
        return await self.upstream(route).request(
            b"GET",
            route.repository,
            f"blobs/{digest}",
            f"blob {route.describe()}" + (f" from byte {offset}" if offset else ""),
            headers,
            by_digest=True,
            start_with=start_with,
        )

    def _resumer(self, route: Route, digest: Digest) -> Resumer:
        async def resume(offset: int, last_mirror: str) -> UpstreamResponse:
            return await self._get_blob(route, digest, offset, start_with=last_mirror)

        return resume

    def _start_fill(
        self, route: Route, digest: Digest, response: UpstreamResponse
    ) -> BlobFill | None:
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
        except OSError:
            return None
        upstream = route.registry.upstream
        policy = FillPolicy(
            resume_attempts=upstream.resume_attempts,
            body_timeout=upstream.body_timeout,
            fill_without_clients=self._config.fill_after_disconnect,
        )
        fill = BlobFill(
            digest,
            size,
            fd,
            path,
            response.mirror,
            self._clock,
            policy,
            resume=self._resumer(route, digest),
            on_relay=self._relaying,
            on_data=self.count_fetched,
            spool=self._spool,
        )
        self._fills[digest] = fill
        self.log.info(
            "fetching blob {what} ({size} bytes) from {mirror}",
            what=route.describe(),
            size="?" if size is None else size,
            mirror=response.mirror,
        )
        fill.verified.addCallbacks(
            self._commit, self._done_with, callbackArgs=(fill,), errbackArgs=(fill,)
        )
        fill.start(response)
        return fill

    def _relaying(self, fill: BlobFill, problem: str) -> None:
        """A fill could not write its file: report it, and hand it out no more."""
        self.store.report_problem(problem)
        self._done_with(None, fill)

    def _commit(self, size: int, fill: BlobFill) -> None:
        if not fill.cacheable:
            self._done_with(None, fill)
            return

        def stored(ok: bool) -> None:
            if not ok:
                fill.discard_file()
            self._done_with(None, fill)

        self.store.commit_blob(fill.digest, fill.path, size).addCallback(stored)

    def _done_with(self, _: object, fill: BlobFill) -> None:
        """Stop handing out a fill: new requests go to the store."""
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
            fill.release()
            fill.settled.callback(None)

    async def drain(self, timeout: float) -> None:
        """
        Wait, up to C{timeout} seconds, for the downloads in progress to
        finish and be stored; then drop the rest.  For a graceful stop.
        """
        fills = list(self._fills.values())
        if not fills:
            return
        self.log.info(
            "waiting up to {timeout}s for {count} downloads in progress",
            timeout=timeout,
            count=len(fills),
        )
        # Wait on observers: cancelling a DeferredList cancels what is in it,
        # and the fills' own "settled" are for their owner to fire.
        try:
            await within(timeout, self._clock, DeferredList([_observe(f.settled) for f in fills]))
        except TimedOut:
            for fill in fills:
                fill.fail(Failure(FillAbandoned("txregistry is stopping")))

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


def _observe(fired: Deferred[None]) -> Deferred[None]:
    """A Deferred that fires when C{fired} does, and can be cancelled alone."""
    observer: Deferred[None] = Deferred()

    def tell(result: object) -> object:
        if not observer.called:
            observer.callback(None)
        return result

    fired.addBoth(tell)
    return observer


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
