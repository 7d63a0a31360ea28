"""
Faults injected between txregistry and a real distribution registry: what
the client sees, and what ends up in the cache, for a cut, a flipped byte,
a stall, a trickle and a reset.
"""

import re

import pytest
import pytest_twisted
import treq
from conftest import FAULT_BLOB_SIZE as SIZE
from harness.faults import Fault
from harness.registry import hub
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone

from txregistry.config import MirrorConfig, RegistryConfig, UpstreamConfig

pytestmark = pytest.mark.integration


class Reader(Protocol):
    """Reads a whole body, and says whether it ended cleanly."""

    def __init__(self):
        self.data = bytearray()
        self.done = Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(reason.check(ResponseDone) is not None)


async def get(tx, digest):
    """GET a blob through txregistry: status, X-Cache, body, and whether it ended cleanly."""
    response = await treq.get(f"{tx.url}/v2/library/faults/blobs/{digest}", unbuffered=True)
    reader = Reader()
    response.deliverBody(reader)
    clean = await reader.done
    return (
        response.code,
        response.headers.getRawHeaders("x-cache", [""])[0],
        bytes(reader.data),
        clean,
    )


def through(proxy, **upstream):
    return hub(proxy.url, upstream=UpstreamConfig(**upstream))


@pytest_twisted.ensureDeferred
async def test_cut_connection_is_resumed_and_the_client_never_notices(
    blob, proxy, start_txregistry, logs
):
    digest, data = blob
    proxy.inject(Fault(f"/blobs/{digest}", "cut", at=1_000_000))
    tx = start_txregistry(through(proxy))
    assert await get(tx, digest) == (200, "MISS", data, True)
    gets = proxy.requests_for(f"/blobs/{digest}")
    assert len(gets) == 2
    # From the bytes that reached txregistry: an abort can lose some in flight.
    resumed_at = int(re.search(r"Range: bytes=(\d+)-", gets[1])[1])
    assert 0 < resumed_at <= 1_000_000
    assert logs.matching(f"cut after {resumed_at} bytes")
    assert (await get(tx, digest))[:2] == (200, "HIT")


@pytest_twisted.ensureDeferred
async def test_cuts_beyond_resume_attempts_abort_the_client_and_cache_nothing(
    blob, proxy, start_txregistry
):
    digest, data = blob
    proxy.inject(Fault(f"/blobs/{digest}", "cut", at=300_000, times=3))
    tx = start_txregistry(through(proxy, resume_attempts=2))
    code, _, body, clean = await get(tx, digest)
    assert code == 200 and not clean and len(body) < SIZE
    assert len(proxy.requests_for(f"/blobs/{digest}")) == 3
    # Nothing was cached: the next pull downloads again, and gets it all.
    assert await get(tx, digest) == (200, "MISS", data, True)


@pytest_twisted.ensureDeferred
async def test_flipped_byte_aborts_the_client_and_caches_nothing(blob, proxy, start_txregistry):
    digest, data = blob
    proxy.inject(Fault(f"/blobs/{digest}", "flip", at=SIZE // 2))
    tx = start_txregistry(through(proxy))
    code, _, body, clean = await get(tx, digest)
    assert code == 200 and not clean
    # Never the last byte of a corrupt blob (and an abort may lose a few more).
    assert len(body) <= SIZE - 1
    assert await get(tx, digest) == (200, "MISS", data, True)


@pytest_twisted.ensureDeferred
async def test_stalled_download_is_cut_and_resumed(blob, proxy, start_txregistry):
    digest, data = blob
    fault = proxy.inject(Fault(f"/blobs/{digest}", "stall", at=700_000))
    # A short body_timeout, so that the stall is noticed quickly.
    tx = start_txregistry(through(proxy, body_timeout=0.5))
    result = await get(tx, digest)
    assert await fault.stalled == 700_000
    assert result == (200, "MISS", data, True)
    # A stall loses nothing: the resume starts where the bytes stopped.
    assert "Range: bytes=700000-" in proxy.requests_for(f"/blobs/{digest}")[1]
    assert (await get(tx, digest))[:2] == (200, "HIT")


@pytest_twisted.ensureDeferred
async def test_trickling_upstream_is_followed_to_the_end(blob, proxy, start_txregistry):
    digest, data = blob
    proxy.inject(Fault(f"/blobs/{digest}", "trickle", chunk=64 * 1024, interval=0.002))
    tx = start_txregistry(through(proxy))
    assert await get(tx, digest) == (200, "MISS", data, True)
    assert len(proxy.requests_for(f"/blobs/{digest}")) == 1
    assert (await get(tx, digest))[:2] == (200, "HIT")


@pytest_twisted.ensureDeferred
async def test_reset_before_headers_fails_over_or_is_a_502(blob, proxy, upstream, start_txregistry):
    digest, data = blob
    proxy.inject(Fault(f"/blobs/{digest}", "reset", times=2))
    alone = start_txregistry(through(proxy))
    response = await treq.get(f"{alone.url}/v2/library/faults/blobs/{digest}")
    assert response.code == 502
    assert proxy.url in (await response.json())["errors"][0]["message"]

    mirrors = (MirrorConfig(proxy.url), MirrorConfig(upstream.url))
    tx = start_txregistry(RegistryConfig("docker.io", mirrors, default=True))
    assert await get(tx, digest) == (200, "MISS", data, True)
    assert (await get(tx, digest))[:2] == (200, "HIT")


@pytest_twisted.ensureDeferred
async def test_segmented_fill_through_throttled_connections_is_whole_and_cached(
    blob, proxy, start_txregistry, logs
):
    """
    Each connection at 1 MB/s: after a quarter of a second, with most of the 3 MiB
    blob still to come, its last MiB is asked for as a Range segment beside
    the first connection, and the client still gets every byte, in order,
    verified.
    """
    digest, data = blob
    proxy.inject(Fault(f"/blobs/{digest}", "throttle", rate=1e6, times=1000))
    tx = start_txregistry(through(proxy, segments=3, segments_above=1 << 20))
    assert await get(tx, digest) == (200, "MISS", data, True)
    asked = [re.search(r"Range: (bytes=[\d-]+)", r) for r in proxy.requests_for(digest)]
    assert sorted(m[1] for m in asked if m) == [f"bytes={2 << 20}-{SIZE - 1}"]
    assert logs.matching("in 2 segments")
    assert (await get(tx, digest))[:2] == (200, "HIT")
