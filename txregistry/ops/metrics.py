"""
txregistry's Prometheus metrics, at C{/metrics} on the main listeners.

Most figures are read when scraped from counters the parts already keep
(mirror states, the store, the cache's fills); requests and the bytes sent
from the cache are counted as requests finish.  Labels are registry names,
mirror URLs, request kinds, statuses and cache results: never a secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from txregistry.ops.files import FileDescriptors
    from txregistry.repository.pullthrough import PullThroughCache
    from txregistry.storage.interface import IStorage
    from txregistry.storage.scrub import Scrubber
    from txregistry.upstream.client import Upstream
    from txregistry.upstream.peers import Fleet

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def counts_as_hit(kind: str, status: int, cache: str) -> bool | None:
    """
    How a request counts for the hit ratio: a hit (served from the cache,
    C{HIT} or C{STALE}), a miss (fetched from the upstream, C{MISS}), or not
    at all (C{None}).  Only manifests and blobs answered with content count:
    a 404, a 502 or any other error served nothing, from the cache or not,
    and tag lists and referrers are never cached.
    """
    if kind not in ("manifest", "blob") or not 200 <= status < 300:
        return None
    if cache in ("HIT", "STALE"):
        return True
    if cache == "MISS":
        return False
    return None


class _StateCollector(Collector):
    """Reads the parts' own counters at each scrape."""

    def __init__(
        self,
        cache: PullThroughCache,
        upstreams: dict[str, Upstream],
        storage: IStorage,
        scrubber: Scrubber | None,
        fleet: Fleet | None = None,
    ) -> None:
        self._cache = cache
        self._upstreams = upstreams
        self._storage = storage
        self._scrubber = scrubber
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "txregistry_upstream_requests",
            "Requests sent to upstream mirrors",
            labels=["registry", "mirror"],
        )
        failures = CounterMetricFamily(
            "txregistry_upstream_failures",
            "Upstream requests that got no usable answer (no connection, timeout, 5xx, 429)",
            labels=["registry", "mirror"],
        )
        ratelimit = GaugeMetricFamily(
            "txregistry_dockerhub_ratelimit_remaining",
            "The last ratelimit-remaining Docker Hub sent",
            labels=["registry"],
        )
        usable = GaugeMetricFamily(
            "txregistry_registry_usable",
            "1 if a mirror that resolves tags is usable (not backing off, last request"
            " answered), 0 if none is; /health then says degraded",
            labels=["registry"],
        )
        for name, upstream in self._upstreams.items():
            usable.add_metric([name], 1 if upstream.mirrors.usable() else 0)
            for state in upstream.mirrors.states:
                requests.add_metric([name, state.mirror.url], state.requests)
                failures.add_metric([name, state.mirror.url], state.failures_total)
            if upstream.ratelimit_remaining is not None:
                ratelimit.add_metric([name], upstream.ratelimit_remaining)
        yield requests
        yield failures
        yield usable
        yield ratelimit
        if self._fleet is not None:
            yield from _peer_metrics(self._fleet)
        yield CounterMetricFamily(
            "txregistry_upstream_fetched_bytes",
            "Bytes of blobs and manifests received from upstream",
            value=self._cache.fetched_bytes,
        )
        yield CounterMetricFamily(
            "txregistry_single_flight_joins",
            "Requests that shared another request's upstream fetch",
            value=self._cache.joins,
        )
        yield GaugeMetricFamily(
            "txregistry_fills_in_flight",
            "Blob downloads in progress",
            value=len(self._cache.fills),
        )
        yield GaugeMetricFamily(
            "txregistry_cache_size_bytes",
            "Bytes the cache holds, pinned content included (updated every 15s)",
            value=self._storage.figures.size,
        )
        yield GaugeMetricFamily(
            "txregistry_cache_entries",
            "Entries in the cache: blobs, manifests and tag answers (updated every 15s)",
            value=self._storage.figures.entries,
        )
        yield GaugeMetricFamily(
            "txregistry_cache_pinned_bytes",
            "Bytes of pinned content, which eviction never removes (updated every 15s)",
            value=self._storage.figures.pinned_size,
        )
        yield GaugeMetricFamily(
            "txregistry_cache_pinned_entries",
            "Pinned entries (pushed content), which eviction never removes (updated every 15s)",
            value=self._storage.figures.pinned_entries,
        )
        figures = self._storage.figures
        answers = figures.hits + figures.misses
        if answers:
            yield GaugeMetricFamily(
                "txregistry_cache_hit_ratio",
                "Share of manifest and blob answers served from the cache (HIT or STALE)"
                " since the cache was created; errors count as neither (updated every 15s)",
                value=figures.hits / answers,
            )
        yield CounterMetricFamily(
            "txregistry_cache_evictions",
            "Entries evicted to stay under the size limit",
            value=self._storage.evictions,
        )
        yield CounterMetricFamily(
            "txregistry_cache_corrupt_removed",
            "Entries removed for failing a check (wrong size or digest): on reading, by the"
            " scrub or by cache verify, since start",
            value=self._storage.corrupt_removed,
        )
        if self._scrubber is not None:
            yield CounterMetricFamily(
                "txregistry_scrub_checked_bytes",
                "Bytes of cached blobs and manifests re-hashed by the background scrub",
                value=self._scrubber.checked_bytes,
            )
            yield CounterMetricFamily(
                "txregistry_scrub_passes",
                "Passes of the background scrub over the whole cache completed",
                value=self._scrubber.passes,
            )
        # The S3 backend's bucket (issue 11).
        bucket_hits = getattr(self._storage, "bucket_hits", None)
        if bucket_hits is not None:
            yield CounterMetricFamily(
                "txregistry_bucket_hits",
                "Blobs and manifests served from the bucket that the local tier did not hold",
                value=bucket_hits,
            )
            yield CounterMetricFamily(
                "txregistry_bucket_writes",
                "Objects written to the bucket",
                value=getattr(self._storage, "bucket_writes", 0),
            )
            yield CounterMetricFamily(
                "txregistry_bucket_failures",
                "Bucket requests that failed after their retries",
                value=getattr(self._storage, "bucket_failures", 0),
            )


class _FilesCollector(Collector):
    """File descriptors: the limit, how many are open, and connections refused for want of one."""

    def __init__(self, files: FileDescriptors) -> None:
        self._files = files

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "txregistry_fd_limit",
            "The soft limit of open file descriptors (RLIMIT_NOFILE)",
            value=self._files.soft_limit,
        )
        in_use = self._files.in_use()
        if in_use is not None:
            yield GaugeMetricFamily(
                "txregistry_open_fds", "File descriptors open now", value=in_use
            )
        yield CounterMetricFamily(
            "txregistry_fd_exhaustion",
            "Connections that could not be accepted for want of a file descriptor",
            value=self._files.refused_total,
        )


def _peer_metrics(fleet: Fleet) -> Iterator[Metric]:
    """Requests to each fleet peer, and those without a usable answer."""
    fetches = CounterMetricFamily(
        "txregistry_peer_fetches",
        "Requests sent to fleet peers for content by digest",
        labels=["peer"],
    )
    failures = CounterMetricFamily(
        "txregistry_peer_failures",
        "Peer requests without a usable answer (no connection, timeout, bad content,"
        " an error status other than 404)",
        labels=["peer"],
    )
    for state in fleet.states:
        fetches.add_metric([state.mirror.url], state.requests)
        failures.add_metric([state.mirror.url], state.failures_total)
    yield fetches
    yield failures


class Metrics:
    """The metrics of one txregistry, in a registry of their own."""

    def __init__(
        self,
        cache: PullThroughCache,
        upstreams: dict[str, Upstream],
        storage: IStorage,
        scrubber: Scrubber | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "txregistry_requests",
            "Requests answered, by kind, status and cache result",
            ["kind", "status", "cache"],
            registry=self.registry,
        )
        self.served_from_cache = Counter(
            "txregistry_cache_served_bytes",
            "Bytes sent to clients from the cache",
            registry=self.registry,
        )
        self.registry.register(_StateCollector(cache, upstreams, storage, scrubber, fleet))
        self._storage = storage

    def watch_files(self, files: FileDescriptors) -> None:
        """Report the process's file descriptors too."""
        self.registry.register(_FilesCollector(files))

    def request_done(self, kind: str, status: int, cache: str, sent: int) -> None:
        """
        Count a finished request: in the request counters, and, when it is
        an answer for the hit ratio, with the storage, where C{txregistry
        cache stats} reads it.
        """
        self.requests.labels(kind, str(status), cache.lower() or "none").inc()
        if cache in ("HIT", "STALE"):
            self.served_from_cache.inc(sent)
        from_cache = counts_as_hit(kind, status, cache)
        if from_cache is not None:
            self._storage.count_answer(from_cache)

    def render(self) -> bytes:
        return generate_latest(self.registry)
