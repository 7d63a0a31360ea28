"""
Segmented downloads, in memory: a large blob fetched as several Range
requests, in any order, reaches its clients in order from the first byte,
verified before the last; a mirror that ignores Range gets one stream; a
cut segment is resumed.
"""

import errno
import itertools
import os

import pytest
from harness.memory import FakeRegistry, MemoryRegistry
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from txregistry.config import MirrorConfig, RegistryConfig, UpstreamConfig
from txregistry.oci.reference import Digest
from txregistry.repository import segments as segments_module
from txregistry.repository.fill import BlobFill, FillPolicy
from txregistry.repository.segments import (
    ALIGN,
    FAST_CONNECTION,
    SEGMENT_AFTER,
    plan,
    worth_segmenting,
)
from txregistry.storage import staging
from txregistry.storage.disk import DiskStorage
from txregistry.storage.runner import run_inline

MiB = 1 << 20
# Three segments: [0, 1 MiB), [1 MiB, 2 MiB), [2 MiB, end).
BLOB = os.urandom(3 * MiB - 1000)
SECOND = f"bytes={MiB}-{2 * MiB - 1}"
THIRD = f"bytes={2 * MiB}-{len(BLOB) - 1}"


def test_plan_leaves_small_and_unknown_blobs_whole():
    assert plan(None, 4, 0) == [(0, 0)]
    assert plan(64 * MiB, 4, 64 * MiB) == [(0, 64 * MiB)]
    assert plan(100 * MiB, 1, 0) == [(0, 100 * MiB)]


@pytest.mark.parametrize("size", [65 * MiB + 1, 256 * MiB, 3 * MiB - 1000, 1000 * MiB + 7])
@pytest.mark.parametrize("segments", [2, 3, 4, 16])
def test_plan_covers_the_blob_in_aligned_spans(size, segments):
    spans = plan(size, segments, 1)
    assert 1 < len(spans) <= segments
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert all(start % ALIGN == 0 and start < end for start, end in spans)


@pytest.mark.parametrize("front", [1, MiB // 2, 40 * MiB + 5])
def test_a_plan_made_late_shares_what_the_front_does_not_have(front):
    spans = plan(100 * MiB, 4, MiB, front)
    assert spans[0] == (0, spans[1][0]) and spans[0][1] > front
    assert len(spans) == 4 and spans[-1][1] == 100 * MiB
    assert all(start % ALIGN == 0 for start, _ in spans)


def test_a_fast_download_is_not_worth_segmenting():
    # Half of it in half a second: done in another half.
    assert not worth_segmenting(100, 50, 0.5)
    # A tenth of it: another 4.5 s at that rate.
    assert worth_segmenting(100, 10, 0.5)
    assert not worth_segmenting(100, 100, 0.5)
    # A connection faster than FAST_CONNECTION is left alone, however large the blob.
    assert not worth_segmenting(100 * FAST_CONNECTION, FAST_CONNECTION, 0.5)
    assert worth_segmenting(100 * FAST_CONNECTION, FAST_CONNECTION // 4, 0.5)


def test_a_download_that_is_fast_enough_stays_one_stream(tmp_path):
    registry = registry_with(tmp_path)
    digest = registry.upstream.add_blob(BLOB)
    held = registry.upstream.hold_blob(digest)
    client = registry.client()
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    held[0].write(BLOB[: 2 * MiB])
    registry.pump()
    registry.clock.advance(SEGMENT_AFTER)
    registry.pump()
    assert ranges(held) == [None]
    held[0].write(BLOB[2 * MiB :])
    held[0].finish()
    registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


def registry_with(tmp_path, mirrors=("https://registry-1.docker.io",), hosts=None, **upstream):
    upstream.setdefault("segments", 3)
    upstream.setdefault("segments_above", MiB)
    config = RegistryConfig(
        "docker.io",
        tuple(MirrorConfig(m) for m in mirrors),
        default=True,
        upstream=UpstreamConfig(**upstream),
    )
    return MemoryRegistry(tmp_path, registries=[config], hosts=hosts or {})


def start(registry, upstream=None):
    upstream = upstream or registry.upstream
    digest = upstream.add_blob(BLOB)
    held = upstream.hold_blob(digest)
    client = registry.client()
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    # Nothing has arrived by then: slow enough to be worth segmenting.
    registry.clock.advance(SEGMENT_AFTER)
    return client, held, digest


def _start(request):
    return int((request.getHeader(b"range") or b"bytes=0-")[6:].split(b"-")[0])


def in_order(held):
    """The held requests, the first (no Range) first, then by where they start."""
    return held[:1] + sorted(held[1:], key=_start)


def ranges(held):
    """The Range of each request (the upstream may see them in any order)."""
    return [(request.getHeader(b"range") or b"").decode() or None for request in in_order(held)]


def body(client):
    """What the client has of the body so far (nothing, before the headers)."""
    return client.response().body if client.transport.value() else b""


def cached(registry, digest):
    return registry.storage.open_blob(Digest.parse(digest)).result is not None


def test_segments_arrive_in_any_order_and_clients_get_them_in_order(tmp_path, logs):
    registry = registry_with(tmp_path)
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    assert ranges(held) == [None, SECOND, THIRD]
    # The last segment first, then half of the second: nothing reaches the
    # client before the bytes in front of it.
    held[2].write(BLOB[2 * MiB :])
    held[2].finish()
    held[1].write(BLOB[MiB : MiB + MiB // 2])
    registry.pump()
    assert body(client) == b""
    # The front runs past its span: the second segment takes over, and the
    # front's connection is cut.
    held[0].write(BLOB[: MiB + 5000])
    registry.pump()
    assert held[0]._disconnected
    response = client.response()
    # All it has but the last byte, which waits for the digest.
    assert response.body == BLOB[: MiB + MiB // 2 - 1] and not response.complete
    held[1].write(BLOB[MiB + MiB // 2 : 2 * MiB])
    # Every byte has arrived but the second segment's response has not ended:
    # in order, all of the blob but its last byte would be sendable, and
    # the last only once it is verified, which it now is.
    held[1].finish()
    registry.pump()
    response = client.response()
    assert (response.status, response.body, response.complete) == (200, BLOB, True)
    assert cached(registry, digest)
    assert len(registry.upstream.requests("GET", "/blobs/")) == 3
    assert logs.matching("in 3 segments")


def test_the_last_byte_waits_for_the_digest(tmp_path):
    registry = registry_with(tmp_path)
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    held[0].write(BLOB[:MiB])
    held[1].write(BLOB[MiB : 2 * MiB])
    held[1].finish()
    held[2].write(BLOB[2 * MiB : -1])
    registry.pump()
    assert client.response().body == BLOB[:-2]
    held[2].write(BLOB[-1:])
    registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


def test_a_corrupt_segment_fails_the_blob_and_nothing_is_cached(tmp_path):
    registry = registry_with(tmp_path, resume_attempts=0)
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    bad = bytearray(BLOB[2 * MiB :])
    bad[100] ^= 1
    held[2].write(bytes(bad))
    held[2].finish()
    held[1].write(BLOB[MiB : 2 * MiB])
    held[1].finish()
    held[0].write(BLOB[:MiB])
    registry.pump()
    response = client.response()
    assert response.aborted and not response.complete
    assert len(response.body) < len(BLOB)
    assert not cached(registry, digest)
    assert list(registry.storage.tmp_directory.iterdir()) == []


def test_a_mirror_that_ignores_range_gets_one_stream(tmp_path, logs):
    registry = registry_with(tmp_path)
    registry.upstream.honor_range = False
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    # The segments' 200s are cut at once; the front carries on through them.
    assert all(request._disconnected for request in held[1:])
    held[0].write(BLOB)
    held[0].finish()
    registry.pump()
    response = client.response()
    assert (response.body, response.complete) == (BLOB, True)
    assert cached(registry, digest)
    assert logs.matching("ignored a Range request")
    assert len(held) == 3


def test_a_segment_the_upstream_refuses_is_fetched_by_the_front(tmp_path):
    registry = registry_with(tmp_path)

    def refuse_third(request):
        if request.getHeader(b"range") == THIRD.encode():
            request.setResponseCode(416)
            return b""
        return None

    registry.upstream.hooks.insert(0, refuse_third)
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    assert ranges(held) == [None, SECOND]
    held[1].write(BLOB[MiB : 2 * MiB])
    held[1].finish()
    held[0].write(BLOB[:MiB])
    registry.pump()
    # The second segment took over and ended; its successor failed, so the
    # fill resumes from its first byte, as one stream to the end.
    assert held[0]._disconnected
    assert ranges(held)[2:] == [f"bytes={2 * MiB}-"]
    held[2].write(BLOB[2 * MiB :])
    held[2].finish()
    registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


def test_a_cut_segment_is_resumed_from_the_byte_it_had(tmp_path, logs):
    registry = registry_with(tmp_path)
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    held[1].write(BLOB[MiB : MiB + 300_000])
    registry.pump()
    held[1].channel.transport.loseConnection()
    registry.pump()
    assert held[3].getHeader(b"range") == f"bytes={MiB + 300_000}-{2 * MiB - 1}".encode()
    assert logs.matching("cut after 300000 bytes")
    held[0].write(BLOB[:MiB])
    held[3].write(BLOB[MiB + 300_000 : 2 * MiB])
    held[3].finish()
    held[2].write(BLOB[2 * MiB :])
    held[2].finish()
    registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


def test_a_live_segment_that_is_cut_is_resumed_too(tmp_path):
    registry = registry_with(tmp_path)
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    held[0].write(BLOB[:MiB])
    held[1].write(BLOB[MiB : MiB + 1000])
    registry.pump()
    assert client.response().body == BLOB[: MiB + 1000 - 1]
    held[1].channel.transport.loseConnection()
    registry.pump()
    assert held[3].getHeader(b"range") == f"bytes={MiB + 1000}-{2 * MiB - 1}".encode()
    held[3].write(BLOB[MiB + 1000 : 2 * MiB])
    held[3].finish()
    held[2].write(BLOB[2 * MiB :])
    held[2].finish()
    registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


def test_late_joiners_share_the_one_segmented_download(tmp_path):
    registry = registry_with(tmp_path)
    first, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    held[2].write(BLOB[2 * MiB :])
    held[2].finish()
    held[0].write(BLOB[: MiB // 2])
    registry.pump()
    late = registry.client()
    late.send("GET", f"/v2/alpine/blobs/{digest}")
    held[0].write(BLOB[MiB // 2 : MiB])
    held[1].write(BLOB[MiB : 2 * MiB])
    held[1].finish()
    registry.pump()
    assert first.response().body == BLOB and late.response().body == BLOB
    assert len(registry.upstream.requests("GET", "/blobs/")) == 3
    assert cached(registry, digest)


def test_segments_are_spread_over_mirrors_digest_only_ones_too(tmp_path):
    a, b = FakeRegistry(), FakeRegistry()
    config = RegistryConfig(
        "docker.io",
        (MirrorConfig("https://a.test"), MirrorConfig("https://b.test", resolve_tags=False)),
        default=True,
        upstream=UpstreamConfig(segments=3, segments_above=MiB),
    )
    registry = MemoryRegistry(tmp_path, registries=[config], hosts={"a.test": a, "b.test": b})
    digest = a.add_blob(BLOB)
    b.add_blob(BLOB)
    held_a, held_b = a.hold_blob(digest), b.hold_blob(digest)
    client = registry.client()
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    registry.clock.advance(SEGMENT_AFTER)
    registry.pump()
    assert ranges(held_a) == [None, THIRD] and ranges(held_b) == [SECOND]
    for request, (begin, end) in zip(
        [held_a[1], held_b[0], held_a[0]],
        [(2 * MiB, len(BLOB)), (MiB, 2 * MiB), (0, MiB)],
        strict=False,
    ):
        request.write(BLOB[begin:end])
        registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


def test_small_blobs_are_not_segmented(tmp_path):
    registry = registry_with(tmp_path, segments_above=len(BLOB))
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    assert ranges(held) == [None]
    held[0].write(BLOB)
    held[0].finish()
    registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


class _Body:
    """An upstream response whose body the test feeds by hand, over a StringTransport."""

    def __init__(self, code, size, content_range=None):
        self.mirror = "https://mirror.test"
        self.code = code
        self.content_length = size
        self._range = content_range
        self.response = self
        self.transport = StringTransport()
        self.protocol = None

    def header(self, name):
        return self._range if name == "Content-Range" else None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def feed(self, data, between=lambda: None, step=256 * 1024):
        for i in range(0, len(data), step):
            assert self.transport.producerState != "paused", "fed while paused"
            self.protocol.dataReceived(data[i : i + step])
            between()


class _Runner:
    """A storage runner that runs each call only when the test says."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def run_all(self):
        while self.calls:
            f, args, d = self.calls.pop(0)
            d.callback(f(*args))


def test_a_segment_ahead_pauses_while_its_writes_wait_and_memory_stays_bounded(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(segments_module, "AHEAD_BUFFER", 512 * 1024)
    storage = DiskStorage(tmp_path / "cache", 1 << 30, run_inline)
    storage.start()
    digest = Digest.of(BLOB)
    staged = storage.stage_blob(digest)
    runner = _Runner()
    staged._run = runner
    bodies = {}

    def fetch(start, end, first):
        body = _Body(206, end - start, f"bytes {start}-{end - 1}/{len(BLOB)}")
        bodies[start] = body
        return succeed(body)

    policy = FillPolicy(segments=3, segments_above=MiB)
    fill = BlobFill(digest, len(BLOB), staged, "https://mirror.test", Clock(), policy,
                    fetch_range=fetch, mirrors=lambda: ["https://mirror.test"])  # fmt: skip
    front = _Body(200, len(BLOB))
    clock = fill.clock
    fill.start(front)
    clock.advance(SEGMENT_AFTER)
    third = bodies[2 * MiB]
    # One write in flight, then the buffer fills and the connection pauses.
    third.feed(BLOB[2 * MiB : 2 * MiB + 768 * 1024])
    assert third.transport.producerState == "paused"
    assert fill._segments.segments[1]._pending_size <= 512 * 1024
    runner.run_all()
    assert third.transport.producerState == "producing"
    third.feed(BLOB[2 * MiB + 768 * 1024 :], runner.run_all)
    bodies[MiB].feed(BLOB[MiB : 2 * MiB], runner.run_all)
    third.protocol.connectionLost(Failure(ResponseDone()))
    bodies[MiB].protocol.connectionLost(Failure(ResponseDone()))
    front.feed(BLOB[:MiB])
    # The front's connection is cut, and what is ahead is read back in order.
    assert front.transport.producerState == "stopped"
    while runner.calls:
        runner.run_all()
    assert fill.verified.called and fill.verified.result == len(BLOB)
    assert fill.received == len(BLOB)
    fill.release()


def test_segments_that_cannot_write_ahead_leave_the_blob_to_the_front(tmp_path, monkeypatch):
    def disk_full(fd, chunks, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging, "_pwrite_all", disk_full)
    registry = registry_with(tmp_path)
    client, held, digest = start(registry)
    registry.pump()
    held[:] = in_order(held)
    held[1].write(BLOB[MiB : MiB + 1000])
    held[2].write(BLOB[2 * MiB : 2 * MiB + 1000])
    registry.pump()
    # Their connections are cut; the front carries on through their spans.
    assert held[1]._disconnected and held[2]._disconnected
    held[0].write(BLOB)
    held[0].finish()
    registry.pump()
    assert not held[0]._disconnected and len(held) == 3
    assert client.response().body == BLOB and cached(registry, digest)
