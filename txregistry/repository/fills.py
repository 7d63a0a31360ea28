"""
The blob downloads in progress: one per digest, shared by every request
for it, and committed to storage once verified.

Concurrent requests for the same uncached blob share one upstream GET (a
L{SingleFlight} of starts) and then one L{BlobFill}, which each follows at
its own pace.  A fill is handed out only while it is listed here: we hold a
reference, so what it staged is still readable.  Once it is committed (or
has failed) it is listed no more, and new requests go to storage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txregistry.config import CacheConfig
from txregistry.oci.reference import Digest
from txregistry.oci.verify import BlobCheckFailed
from txregistry.repository.fill import BlobFill, FillAbandoned, FillPolicy, Resumer
from txregistry.repository.interface import BlobFilling, Route
from txregistry.repository.segments import FetchRange
from txregistry.repository.singleflight import SingleFlight
from txregistry.storage.interface import IStorage
from txregistry.upstream.bodies import TimedOut, within
from txregistry.upstream.client import UpstreamResponse


class BlobFills:
    """
    The fills in progress, by digest.

    @ivar followers: requests that followed a fill another request started.
    """

    log = Logger()

    def __init__(
        self,
        storage: IStorage,
        clock: IReactorTime,
        config: CacheConfig,
        on_data: Callable[[int], None],
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._config = config
        self._on_data = on_data
        self._fills: dict[Digest, BlobFill] = {}
        self._starts: SingleFlight[Digest, BlobFill | None] = SingleFlight()
        self.followers = 0
        # Digests someone is looking up in storage: [lookups, fills committed].
        self._looking: dict[Digest, list[int]] = {}

    def __len__(self) -> int:
        return len(self._fills)

    @property
    def joins(self) -> int:
        """Requests that shared another's upstream request or download."""
        return self._starts.joins + self.followers

    def follow(self, digest: Digest, joining: bool = False) -> BlobFilling | None:
        """
        Follow a download of C{digest} in progress.  C{joining} says the
        request is not the one that started it.
        """
        fill = self._fills.get(digest)
        if fill is None:
            return None
        if joining:
            self.followers += 1
        return BlobFilling(fill.acquire())

    def looking(self, digest: Digest) -> Callable[[], bool]:
        """
        A storage lookup of C{digest} begins; the function returned ends it,
        and says whether a fill of C{digest} was committed meanwhile.  A
        lookup can be slow (a bucket that retries), and a fill that started
        and finished within it is no longer there to follow: without this
        the miss would fetch the blob from the upstream again.
        """
        entry = self._looking.setdefault(digest, [0, 0])
        entry[0] += 1
        commits = entry[1]

        def ended() -> bool:
            entry[0] -= 1
            if entry[0] == 0 and self._looking.get(digest) is entry:
                del self._looking[digest]
            return entry[1] > commits

        return ended

    def start_once(
        self, digest: Digest, start: Callable[[], Awaitable[BlobFill | None]]
    ) -> Deferred[BlobFill | None]:
        """Run C{start} for C{digest}, or join the start already under way."""
        return self._starts.run(digest, start)

    def start(
        self,
        route: Route,
        response: UpstreamResponse,
        resume: Resumer,
        check_failed: Callable[[str, str], None] | None = None,
        fetch_range: FetchRange | None = None,
        mirrors: Callable[[], list[str]] = list,
    ) -> BlobFill | None:
        """
        Start filling storage from a blob response, or return L{None} if
        the blob cannot be stored and must be streamed through instead.
        C{check_failed} is told the source and the reason when what arrived
        fails its size or digest check.
        C{fetch_range} asks for a span of the blob, and C{mirrors} lists the
        mirrors to spread a segmented download over.
        """
        digest = route.digest
        size = response.content_length
        if not self._storage.can_stage(size):
            return None
        try:
            staged = self._storage.stage_blob(digest)
        except OSError:
            return None
        upstream = route.registry.upstream
        policy = FillPolicy(
            resume_attempts=upstream.resume_attempts,
            body_timeout=upstream.body_timeout,
            fill_without_clients=self._config.fill_after_disconnect,
            segments=upstream.segments,
            segments_above=upstream.segments_above,
        )
        fill = BlobFill(
            digest,
            size,
            staged,
            response.mirror,
            self._clock,
            policy,
            resume=resume,
            on_relay=self._relaying,
            on_data=self._on_data,
            fetch_range=fetch_range,
            mirrors=mirrors,
        )
        self._fills[digest] = fill
        self.log.info(
            "fetching blob {what} ({size} bytes) from {mirror}",
            what=route.describe(),
            size="?" if size is None else size,
            mirror=response.mirror,
        )
        if check_failed is not None:

            def tell(failure: Failure) -> Failure:
                if failure.check(BlobCheckFailed):
                    check_failed(fill.source, failure.getErrorMessage())
                return failure

            fill.verified.addErrback(tell)
        fill.verified.addCallbacks(
            self._commit, self._done_with, callbackArgs=(fill,), errbackArgs=(fill,)
        )
        fill.start(response)
        return fill

    def _relaying(self, fill: BlobFill, problem: str) -> None:
        """A fill could not write what it staged: report it, and hand it out no more."""
        self._storage.report_problem(problem)
        self._done_with(None, fill)

    def _commit(self, size: int, fill: BlobFill) -> None:
        if not fill.cacheable:
            self._done_with(None, fill)
            return
        fill.commit().addCallback(self._committed, fill)

    def _committed(self, _: object, fill: BlobFill) -> None:
        entry = self._looking.get(fill.digest)
        if entry is not None:
            entry[1] += 1
        self._done_with(None, fill)

    def _done_with(self, _: object, fill: BlobFill) -> None:
        """Stop handing out a fill: new requests go to storage."""
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


def _observe(fired: Deferred[None]) -> Deferred[None]:
    """A Deferred that fires when C{fired} does, and can be cancelled alone."""
    observer: Deferred[None] = Deferred()

    def tell(result: object) -> object:
        if not observer.called:
            observer.callback(None)
        return result

    fired.addBoth(tell)
    return observer
