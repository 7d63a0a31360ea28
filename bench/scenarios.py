"""
The ten measurements, run against txregistry, the peer and the references.

Every timed measurement is repeated C{runs} times and every sample kept;
the report takes medians.  Within a run the servers are measured one after the
other on the same content, so that they share the machine's state of the
moment.  A fetch that gets the wrong number of bytes stops the bench: a
figure from a broken transfer would be worse than none.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from harness.network import free_port
from harness.skopeo import Skopeo
from harness.swift import (
    ACCESS_KEY,
    BUCKET,
    REGION,
    SECRET_KEY,
    Swift,
    botocore_client,
    create_bucket,
)

from bench.clients import (
    MANIFEST_ACCEPT,
    Fetched,
    added_rss,
    cpu_seconds,
    dd_write,
    fan_out,
    fan_out_counted,
    fan_out_over,
    fetch,
    skopeo_copy,
    wrk,
)
from bench.content import Blob, push_blob, push_image, random_chunks
from bench.pushes import LayerFile, push_layer
from bench.servers import Nginx, Registry, Server, ThrottleProxy, TxRegistry

MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """How big and how many: the full bench, or the quick one CI runs."""

    runs: int
    blob: int
    memory_blob: int
    image_layers: int
    layer_size: int
    wrk_seconds: float
    # Scenario 10: the upstream sends each connection at this many bytes a
    # second; blobs above segments_above are fetched in this many segments.
    throttled_blob: int
    throttle_rate: float
    throttled_runs: int
    segments: int = 4
    segments_above: int = 64 * MiB
    fan_out: int = 8
    connections: int = 16
    fleet_nodes: int = 3


FULL = Sizes(
    runs=5, blob=256 * MiB, memory_blob=1024 * MiB, image_layers=4, layer_size=48 * MiB,
    wrk_seconds=10, throttled_blob=256 * MiB, throttle_rate=32 * MiB, throttled_runs=3,
)  # fmt: skip
QUICK = Sizes(
    runs=2, blob=4 * MiB, memory_blob=16 * MiB, image_layers=2, layer_size=1 * MiB,
    wrk_seconds=1, throttled_blob=4 * MiB, throttle_rate=2 * MiB, throttled_runs=2,
    segments_above=1 * MiB,
)  # fmt: skip

Samples = dict[str, list[float]]
S = TypeVar("S", bound=Server)


def floors(blob_file: Path, scratch: Path) -> tuple[float, float]:
    """
    What any cache that checks and keeps a blob must spend on it, on this
    machine: the seconds to hash it on one core, with the same OpenSSL that
    txregistry's hashlib uses (from memory, in 1 MiB updates), and for
    C{dd} to write it into a new file next to the caches (into the page
    cache, as a cache's own write does).
    """
    data = blob_file.read_bytes()
    view = memoryview(data)
    started = time.perf_counter()
    hasher = hashlib.sha256()
    for start in range(0, len(data), MiB):
        hasher.update(view[start : start + MiB])
    hasher.hexdigest()
    hashing = time.perf_counter() - started
    del view, data
    return hashing, dd_write(blob_file, scratch)


class Bench:
    """The servers, started on loopback, and the samples measured against them."""

    def __init__(
        self,
        directory: Path,
        sizes: Sizes,
        say: Callable[[str], None],
        configure_segments: bool = False,
    ) -> None:
        """C{configure_segments}: give txregistry C{sizes.segments}, not its default."""
        self.directory = directory
        self.sizes = sizes
        self._segment_keys = self._segments_config() if configure_segments else ""
        self.say = say
        self.samples: Samples = defaultdict(list)
        self._seeds = itertools.count(1)
        self._servers: list[Server] = []
        # Left by the cold scenarios for the warm ones.
        self.warm_blob: Blob | None = None
        self.fan_out_blob: Blob | None = None
        self.skopeo = Skopeo(directory / "skopeo")
        # Scenario 8's servers, started only if it runs.
        self.fleet_nodes: list[TxRegistry] = []
        self.fleet_peers: list[Registry] = []
        # Scenario 10's Swift, started only if it runs.
        self.swift: Swift | None = None

    def start(self) -> None:
        self.upstream = self._started(Registry("upstream", self.directory / "upstream"))
        self.peer = self._started(
            Registry("peer", self.directory / "peer", proxy_for=self.upstream.url)
        )
        self.txregistry = self._started(
            TxRegistry(
                self.directory / "txregistry",
                self.upstream.url,
                free_port(),
                free_port(),
                registry_keys=self._segment_keys,
            )
        )
        self.nginx = self._started(
            Nginx(self.directory / "nginx", self.upstream.storage, (free_port(), free_port()))
        )

    def _segments_config(self) -> str:
        sizes = self.sizes
        return f"segments = {sizes.segments}\nsegments_above = {sizes.segments_above}"

    def _started(self, server: S) -> S:
        self._servers.append(server)
        return server

    def stop(self) -> None:
        for server in reversed(self._servers):
            server.stop()
        if self.swift is not None:
            self.swift.stop()

    def run(self, only: Collection[int] = range(1, 11)) -> Samples:
        """Run the scenarios numbered in C{only}, in order; return the samples."""
        scenarios = [
            self.cold_single,
            self.warm_single,
            self.cold_fan_out,
            self.warm_fan_out,
            self.cached_manifest,
            self.memory,
            self.whole_image,
            self.fleet,
            self.push,
            self.from_bucket,
            self.throttled,
        ]
        for number, scenario in enumerate(scenarios, 1):
            if number in only:
                scenario()
        return dict(self.samples)

    # Helpers.

    def _record(self, key: str, value: float) -> None:
        self.samples[key].append(value)

    def _blob(self, size: int) -> Blob:
        return push_blob(self.upstream.port, next(self._seeds), size)

    def _fetch(self, url: str, blob: Blob) -> Fetched:
        fetched = fetch(url)
        if fetched.size != blob.size:
            raise RuntimeError(f"{url}: got {fetched.size} bytes of {blob.size}")
        return fetched

    def _fetch_into(self, fetched: list[Fetched], url: str, blob: Blob) -> None:
        fetched.append(self._fetch(url, blob))

    def _fetch_peer(self, url: str, blob: Blob) -> Fetched | None:
        """The peer's fetch, or None if it did not complete: its figures count only if it did."""
        try:
            return self._fetch(url, blob)
        except RuntimeError as e:
            self.say(f"  the peer's transfer did not complete: {e}")
            return None

    def _warm_up(self, url: str, blob: Blob, attempts: int = 20) -> None:
        """
        Fetch once, untimed, so that every cache holds the blob.  The peer
        answers 500 ("invalid checksum digest format") while it is still
        storing a blob it proxied a moment ago, so this tries again, a
        bounded number of times.
        """
        for attempt in range(attempts):
            try:
                self._fetch(url, blob)
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise

    def _nginx_path(self, blob: Blob) -> str:
        return "/" + str(self.upstream.blob_path(blob.digest).relative_to(self.upstream.storage))

    def _nginx_urls(self, blob: Blob) -> tuple[str, str]:
        path = self._nginx_path(blob)
        return self.nginx.sendfile_url + path, self.nginx.copy_url + path

    def _mb_per_s(self, size: int, seconds: float) -> float:
        return size / seconds / 1e6

    # 1. One client, a blob nobody has cached.

    def cold_single(self) -> None:
        self.say(f"1. cold single client, {self.sizes.blob // MiB} MiB")
        for _ in range(self.sizes.runs):
            blob = self._blob(self.sizes.blob)
            direct = self._fetch(self.upstream.url + blob.path(), blob)
            self._record("cold_single.direct_s", direct.seconds)
            cpu = cpu_seconds(self.txregistry.pid)
            tx = self._fetch(self.txregistry.url + blob.path(), blob)
            self._record("cold_single.txregistry_cpu_s", cpu_seconds(self.txregistry.pid) - cpu)
            self._record("cold_single.txregistry_s", tx.seconds)
            peer = self._fetch_peer(self.peer.url + blob.path(), blob)
            self._record("cold_single.peer_incomplete", 0 if peer else 1)
            if peer is not None:
                self._record("cold_single.peer_s", peer.seconds)
            hashing, writing = floors(
                self.upstream.blob_path(blob.digest), self.directory / "floor.bin"
            )
            self._record("cold_single.sha256_s", hashing)
            self._record("cold_single.write_s", writing)
        self.warm_blob = blob

    # 2. One client, a blob in the cache.

    def _warm_urls(self, blob: Blob) -> list[tuple[str, str]]:
        sendfile, copy = self._nginx_urls(blob)
        return [
            ("txregistry", self.txregistry.url + blob.path()),
            ("peer", self.peer.url + blob.path()),
            ("nginx_sendfile", sendfile),
            ("nginx_copy", copy),
        ]

    def warm_single(self) -> None:
        self.say("2. warm single client")
        blob = self.warm_blob or self._blob(self.sizes.blob)
        urls = self._warm_urls(blob)
        for _, url in urls:
            self._warm_up(url, blob)
        for _ in range(self.sizes.runs):
            for name, url in urls:
                seconds = self._fetch(url, blob).seconds
                self._record(f"warm_single.{name}_mb_s", self._mb_per_s(blob.size, seconds))

    # 3. Eight clients at once, on a blob nobody has cached.

    def cold_fan_out(self) -> None:
        clients = self.sizes.fan_out
        self.say(f"3. cold fan-out, {clients} clients")
        for _ in range(self.sizes.runs):
            blob = self._blob(self.sizes.blob)
            self._record("cold_fan_out.direct_one_s", fan_out(self.upstream.url + blob.path(), 1))
            self._record(
                "cold_fan_out.nginx_s",
                min(fan_out(url, clients) for url in self._nginx_urls(blob)),
            )
            since = self.upstream.mark()
            cpu = cpu_seconds(self.txregistry.pid)
            self._record(
                "cold_fan_out.txregistry_s", fan_out(self.txregistry.url + blob.path(), clients)
            )
            self._record("cold_fan_out.txregistry_cpu_s", cpu_seconds(self.txregistry.pid) - cpu)
            gets = self.upstream.blob_gets(blob.digest, since, self.upstream.mark())
            self._record("cold_fan_out.txregistry_upstream_gets", gets)
            since = self.upstream.mark()
            peer = fan_out_counted(self.peer.url + blob.path(), clients, blob.size)
            if peer.incomplete:
                self.say(f"  {peer.incomplete} of the peer's {clients} transfers did not complete")
            else:
                self._record("cold_fan_out.peer_s", peer.seconds)
            self._record("cold_fan_out.peer_incomplete", peer.incomplete)
            gets = self.upstream.blob_gets(blob.digest, since, self.upstream.mark())
            self._record("cold_fan_out.peer_upstream_gets", gets)
            hashing, writing = floors(
                self.upstream.blob_path(blob.digest), self.directory / "floor.bin"
            )
            self._record("cold_fan_out.sha256_s", hashing)
            self._record("cold_fan_out.write_s", writing)
        self.fan_out_blob = blob

    # 4. Eight clients at once, on a blob in the cache.

    def warm_fan_out(self) -> None:
        clients = self.sizes.fan_out
        self.say(f"4. warm fan-out, {clients} clients")
        blob = self.fan_out_blob or self._blob(self.sizes.blob)
        urls = self._warm_urls(blob)
        for _, url in urls:
            self._fetch(url, blob)
        for _ in range(self.sizes.runs):
            for name, url in urls:
                seconds = fan_out(url, clients)
                self._record(
                    f"warm_fan_out.{name}_mb_s", self._mb_per_s(clients * blob.size, seconds)
                )

    # 5. A manifest by tag, cached and within its TTL.

    def cached_manifest(self) -> None:
        connections = self.sizes.connections
        self.say(f"5. cached manifest by tag, wrk at {connections} connections")
        image = push_image(self.upstream.port, next(self._seeds), 1, 1024)
        path = f"/v2/{image.repository}/manifests/{image.tag}"
        servers = (("txregistry", self.txregistry.url), ("peer", self.peer.url))
        for _, base in servers:
            fetch(base + path, MANIFEST_ACCEPT)  # cached, and within the TTL from here on
        for _ in range(self.sizes.runs):
            for name, base in servers:
                rate = wrk(base + path, connections, self.sizes.wrk_seconds)
                self._record(f"manifest.{name}_rps", rate.requests_per_second)
                self._record(f"manifest.{name}_p99_ms", rate.p99_ms)

    # 6. txregistry's memory while it streams a large blob.

    def memory(self) -> None:
        """Once, not once per run: a 1 GiB blob is slow to make, and a peak is not a time."""
        self.say(f"6. memory, {self.sizes.memory_blob // MiB} MiB")
        blob = self._blob(self.sizes.memory_blob)
        url = self.txregistry.url + blob.path()
        for temperature in ("cold", "warm"):
            added = added_rss(self.txregistry.pid, lambda: self._fetch(url, blob))
            self._record(f"memory.{temperature}_added_mib", added / MiB)

    # 7. A whole image with skopeo.

    def whole_image(self) -> None:
        sizes = self.sizes
        self.say(f"7. whole image, {sizes.image_layers} layers of {sizes.layer_size // MiB} MiB")
        destination = self.directory / "pulled"
        hosts = (
            ("direct", self.upstream.host),
            ("txregistry", self.txregistry.host),
            ("peer", self.peer.host),
        )
        for _ in range(sizes.runs):
            image = push_image(
                self.upstream.port, next(self._seeds), sizes.image_layers, sizes.layer_size
            )
            for temperature in ("cold", "warm"):
                for name, host in hosts:
                    seconds = skopeo_copy(self.skopeo, image.reference(host), destination)
                    self._record(f"image.{temperature}_{name}_s", seconds)

    # 8. A fleet: three nodes, eight cold clients spread over them.

    def _start_fleet(self) -> None:
        count = self.sizes.fleet_nodes
        ports = [free_port() for _ in range(count)]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for i, port in enumerate(ports):
            node = TxRegistry(
                self.directory / f"fleet{i}",
                self.upstream.url,
                port,
                free_port(),
                name=f"fleet{i}",
                peers=urls,
            )
            self.fleet_nodes.append(self._started(node))
        # Against as many distribution proxies, each with its own storage:
        # distribution has no fleet mode.
        for i in range(count):
            peer = Registry(f"peer{i}", self.directory / f"peer{i}", proxy_for=self.upstream.url)
            self.fleet_peers.append(self._started(peer))

    def fleet(self) -> None:
        clients, count = self.sizes.fan_out, self.sizes.fleet_nodes
        self.say(f"8. fleet: {count} nodes, {clients} cold clients spread over them")
        if not self.fleet_nodes:
            self._start_fleet()
        groups: tuple[tuple[str, Sequence[TxRegistry | Registry]], ...] = (
            ("txregistry", self.fleet_nodes),
            ("peer", self.fleet_peers),
        )
        for _ in range(self.sizes.runs):
            blob = self._blob(self.sizes.blob)
            for name, group in groups:
                urls = [group[i % count].url + blob.path() for i in range(clients)]
                since = self.upstream.mark()
                self._record(f"fleet.{name}_s", fan_out_over(urls))
                gets = self.upstream.blob_gets(blob.digest, since, self.upstream.mark())
                self._record(f"fleet.{name}_upstream_gets", gets)
            # A warm GET from a node's local tier, which it filled from the
            # blob's owner, against nginx from disk.
            local = self.fleet_nodes[-1].url + blob.path()
            self._warm_up(local, blob)
            seconds = self._fetch(local, blob).seconds
            self._record("fleet.local_tier_mb_s", self._mb_per_s(blob.size, seconds))
            nginx = min(self._fetch(url, blob).seconds for url in self._nginx_urls(blob))
            self._record("fleet.nginx_mb_s", self._mb_per_s(blob.size, nginx))

    # 9. A layer pushed: to txregistry's hosted registry, through it to the
    # origin (push-through), and to the origin directly.

    def push(self) -> None:
        size = self.sizes.blob
        self.say(f"9. push, one layer of {size // MiB} MiB")
        layer = LayerFile(self.directory / "push-layer", size, next(self._seeds))
        targets = (
            ("direct", self.upstream.host, "library/pushed"),
            ("hosted", self.txregistry.host, "local/pushed"),
            ("push_through", self.txregistry.host, "origin.bench/library/pushed"),
        )
        try:
            for _ in range(self.sizes.runs):
                for name, host, repository in targets:
                    seconds = push_layer(host, repository, layer, layer.next_digest())
                    self._record(f"push.{name}_s", seconds)
        finally:
            layer.path.unlink()

    # 10. A blob another node stored in the bucket, on a node without it.

    def from_bucket(self) -> None:
        """
        txregistry with C{backend = "s3"} on OpenStack Swift: each run a new
        blob goes into the bucket as a fill stores it (under its digest), and
        is fetched through a node whose local tier lacks it, against the
        same object fetched straight from Swift with a presigned URL.
        """
        self.say(f"10. warm from the bucket, empty local tier, {self.sizes.blob // MiB} MiB")
        from txregistry.storage.s3 import object_key

        self.swift = Swift(self.directory / "swift").start()
        create_bucket(self.swift.endpoint, BUCKET)
        s3 = botocore_client(self.swift.endpoint)
        node = self._started(
            TxRegistry(
                self.directory / "txregistry-s3",
                self.upstream.url,
                free_port(),
                free_port(),
                extra_config=(
                    f'[storage]\nbackend = "s3"\n[storage.s3]\nendpoint = "{self.swift.endpoint}"\n'
                    f'bucket = "{BUCKET}"\nprefix = "bench/"\nregion = "{REGION}"\n'
                ),
                extra_env={"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
            )
        )
        for _ in range(self.sizes.runs):
            data = b"".join(random_chunks(next(self._seeds), self.sizes.blob))
            blob = Blob(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))
            key = object_key("bench/", "blob", blob.digest)
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
            del data
            presigned = s3.generate_presigned_url(
                "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600
            )
            self._record("bucket.direct_s", self._fetch(presigned, blob).seconds)
            self._record("bucket.txregistry_s", self._fetch(node.url + blob.path(), blob).seconds)

    # 11. One client, a blob nobody has cached, from an upstream that limits
    # each connection.

    def throttled(self) -> None:
        sizes = self.sizes
        rate = sizes.throttle_rate
        self.say(
            f"11. cold, {sizes.throttled_blob // MiB} MiB, each upstream connection at"
            f" {rate / MiB:g} MiB/s"
        )
        proxy = self._started(ThrottleProxy(self.directory / "throttle", self.upstream.port, rate))
        tx = self._started(
            TxRegistry(
                self.directory / "txregistry-throttled",
                proxy.url,
                free_port(),
                free_port(),
                name="txregistry-throttled",
                registry_keys=self._segments_config(),
            )
        )
        for _ in range(sizes.throttled_runs):
            blob = self._blob(sizes.throttled_blob)
            self._record("throttled.direct_s", self._fetch(proxy.url + blob.path(), blob).seconds)
            fetched: list[Fetched] = []
            fetch_it = functools.partial(self._fetch_into, fetched, tx.url + blob.path(), blob)
            added = added_rss(tx.pid, fetch_it)
            self._record("throttled.txregistry_s", fetched[0].seconds)
            self._record("throttled.txregistry_added_mib", added / MiB)
