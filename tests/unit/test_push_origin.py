"""
Push-through to an origin, in memory: chunking, the origin's minimum chunk
length, resuming from the offset it reports, and the diagnoses of the
field's failures (a body limit, a Location turned to http, storage that
loses blobs).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from harness.origin import URL, FakeOrigin, OriginNetwork
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from txregistry.config import Credentials, MirrorConfig, RegistryConfig, Secret, UpstreamConfig
from txregistry.oci.reference import Digest
from txregistry.upstream.push import ChunkProducer, OriginPusher, PushFailed
from txregistry.upstream.push.body import READ_SIZE
from txregistry.upstream.push.diagnosis import near_round_size

KiB = 1 << 10
PASSWORD = "origin-Passw0rd"
CREDENTIALS = Credentials("pusher", Secret(PASSWORD), "test")


class Source:
    """A blob's bytes, counting the largest read: memory stays one read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.largest_read = 0

    def read(self, offset: int, length: int) -> bytes:
        self.largest_read = max(self.largest_read, length)
        return self.data[offset : offset + length]


def blob(size: int) -> tuple[bytes, Digest]:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    return data, Digest("sha256", hashlib.sha256(data).hexdigest())


def registry(chunk: int = 64 * KiB, credentials: Credentials | None = None, **upstream: Any):
    return RegistryConfig(
        "origin.test",
        (MirrorConfig("https://mirror.test", resolve_tags=False), MirrorConfig(URL)),
        push=True,
        push_chunk_size=chunk,
        credentials=credentials,
        upstream=UpstreamConfig(**upstream),
    )


def run(net: OriginNetwork, coroutine: Any) -> Any:
    """Drive the in-memory network until the push ends; its result, or its failure."""
    done: Deferred[Any] = ensureDeferred(coroutine)
    results: list[Any] = []
    done.addBoth(results.append)
    for _ in range(200):
        if results:
            break
        net.pump()
    assert results, "the push never ended"
    result = results[0]
    if isinstance(result, Failure):
        return result.value
    return result


def patches(origin: FakeOrigin) -> list[tuple[str, int]]:
    return [(s.headers.get("content-range", ""), s.body_length) for s in origin.requests("PATCH")]


@pytest.fixture
def logged():
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events: list[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


def test_a_blob_goes_in_chunks_of_at_most_push_chunk_size(logged):
    origin = FakeOrigin()
    net = OriginNetwork(origin)
    data, digest = blob(150 * KiB)
    source = Source(data)
    pusher = OriginPusher(registry(chunk=64 * KiB), net.agent, net.clock)

    assert run(net, pusher.push_blob("team/app", digest, len(data), source)) is True

    assert origin.blobs[str(digest)] == data
    assert patches(origin) == [
        ("0-65535", 64 * KiB),
        ("65536-131071", 64 * KiB),
        ("131072-153599", 22 * KiB),
    ]
    put = origin.requests("PUT")[0]
    assert f"digest={digest}" in put.path.replace("%3A", ":") and put.body_length == 0
    # The origin is the first mirror that resolves tags, never the digest-only one.
    assert {s.url.split("/")[2] for s in net.agent.sent} == {"origin.test"}
    assert source.largest_read <= READ_SIZE
    lines = texts(logged)
    assert any("POST https://origin.test/v2/team/app/blobs/uploads/" in line for line in lines)
    assert any("PATCH chunk at offset 65536, 65536 bytes" in line for line in lines)
    assert any("PUT after 153600 bytes" in line for line in lines)


def test_a_blob_the_origin_has_is_not_sent_again():
    origin = FakeOrigin()
    net = OriginNetwork(origin)
    data, digest = blob(10 * KiB)
    origin.blobs[str(digest)] = data
    pusher = OriginPusher(registry(), net.agent, net.clock)

    assert run(net, pusher.push_blob("team/app", digest, len(data), Source(data))) is False

    assert [s.method for s in origin.seen] == ["HEAD"]


def test_chunks_are_at_least_the_origins_minimum_length():
    origin = FakeOrigin(min_chunk=100 * KiB)
    net = OriginNetwork(origin)
    data, digest = blob(250 * KiB)
    pusher = OriginPusher(registry(chunk=64 * KiB), net.agent, net.clock)

    run(net, pusher.push_blob("team/app", digest, len(data), Source(data)))

    assert [length for _, length in patches(origin)] == [100 * KiB, 100 * KiB, 50 * KiB]
    assert origin.blobs[str(digest)] == data


@pytest.mark.parametrize("location", ["relative", "absolute"])
def test_relative_and_absolute_locations_are_followed(location):
    origin = FakeOrigin(location=location)
    net = OriginNetwork(origin)
    data, digest = blob(100 * KiB)
    pusher = OriginPusher(registry(chunk=64 * KiB), net.agent, net.clock)

    assert run(net, pusher.push_blob("team/app", digest, len(data), Source(data))) is True
    assert origin.blobs[str(digest)] == data


def test_a_cut_chunk_resumes_from_the_offset_the_origin_reports(logged):
    # The first chunk arrives whole; the second is cut after 10 KiB reached
    # the upload.  The origin reports 0-75775, and the push goes on from 75776.
    origin = FakeOrigin(cuts=[None, 10 * KiB])
    net = OriginNetwork(origin)
    data, digest = blob(150 * KiB)
    pusher = OriginPusher(registry(chunk=64 * KiB), net.agent, net.clock)

    assert run(net, pusher.push_blob("team/app", digest, len(data), Source(data))) is True

    assert origin.blobs[str(digest)] == data
    assert [r for r, _ in patches(origin)] == [
        "0-65535",
        "65536-131071",
        "75776-141311",
        "141312-153599",
    ]
    assert [s.method for s in origin.seen].count("GET") == 1
    assert any(
        "the origin has 75776 bytes of the upload; resuming there" in t for t in texts(logged)
    )


def test_an_upload_the_origin_lost_is_begun_again():
    origin = FakeOrigin(cuts=[None, 10 * KiB], lose_uploads_on_cut=True)
    net = OriginNetwork(origin)
    data, digest = blob(150 * KiB)
    pusher = OriginPusher(registry(chunk=64 * KiB), net.agent, net.clock)

    assert run(net, pusher.push_blob("team/app", digest, len(data), Source(data))) is True

    assert origin.blobs[str(digest)] == data
    assert [s.method for s in origin.seen if s.method == "POST"] == ["POST", "POST"]


def test_a_413_is_diagnosed_as_a_body_limit(logged):
    origin = FakeOrigin(body_limit=100 * KiB)
    net = OriginNetwork(origin)
    data, digest = blob(300 * KiB)
    pusher = OriginPusher(registry(chunk=128 * KiB), net.agent, net.clock)

    error = run(net, pusher.push_blob("team/app", digest, len(data), Source(data)))

    assert isinstance(error, PushFailed)
    assert error.status == 400 and error.code == "BLOB_UPLOAD_INVALID"
    assert "PATCH of the chunk at offset 0 (128KiB)" in error.message
    assert "HTTP 413" in error.message
    assert "lower push_chunk_size (now 128KiB)" in error.message
    assert error.detail["status"] == 413 and error.detail["step"].startswith("PATCH")
    # Not retried: the same body would meet the same limit.
    assert len(origin.requests("PATCH")) == 1
    assert any("lower push_chunk_size" in t for t in texts(logged))


def test_a_cut_just_short_of_a_round_size_is_diagnosed_as_a_body_limit():
    # A proxy that passes 1 MB of each body through, then cuts the connection.
    limit = 1000 * 1000
    origin = FakeOrigin(cuts=[limit - 3000])
    net = OriginNetwork(origin)
    data, digest = blob(3 << 20)
    pusher = OriginPusher(registry(chunk=2 << 20), net.agent, net.clock)

    error = run(net, pusher.push_blob("team/app", digest, len(data), Source(data)))

    assert isinstance(error, PushFailed)
    assert "997000 bytes of the chunk, just short of 1000000 bytes" in error.message
    assert "lower push_chunk_size (now 2MiB)" in error.message
    assert len(origin.requests("PATCH")) == 1


def test_repeated_cuts_end_the_push_after_the_resume_attempts():
    origin = FakeOrigin(cuts=[0, 0, 0, 0, 0])
    net = OriginNetwork(origin)
    data, digest = blob(100 * KiB)
    pusher = OriginPusher(registry(chunk=64 * KiB, resume_attempts=2), net.agent, net.clock)

    error = run(net, pusher.push_blob("team/app", digest, len(data), Source(data)))

    assert isinstance(error, PushFailed)
    assert len(origin.requests("PATCH")) == 3
    assert "the chunk at offset 0 failed 3 times" in error.message
    assert "lower push_chunk_size" in error.message


def test_a_location_that_turns_https_into_http_is_refused_not_followed():
    origin = FakeOrigin(location="http")
    net = OriginNetwork(origin)
    data, digest = blob(10 * KiB)
    pusher = OriginPusher(registry(), net.agent, net.clock)

    error = run(net, pusher.push_blob("team/app", digest, len(data), Source(data)))

    assert isinstance(error, PushFailed)
    assert "POST (starting the upload)" in error.message
    assert "switches from https to http: refused, not followed" in error.message
    assert "X-Forwarded-Proto" in error.message
    assert not any(s.url.startswith("http://") for s in net.agent.sent)
    assert origin.requests("PATCH") == []


def manifest_for(*digests: Digest) -> bytes:
    config, *layers = digests
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"digest": str(config), "size": 1, "mediaType": "x"},
            "layers": [{"digest": str(d), "size": 1, "mediaType": "y"} for d in layers],
        }
    ).encode()


def test_blob_unknown_after_every_blob_was_pushed_is_diagnosed_as_storage():
    origin = FakeOrigin(lose_blobs=True)
    net = OriginNetwork(origin)
    pusher = OriginPusher(registry(), net.agent, net.clock)
    (config, config_digest), (layer, layer_digest) = blob(100), blob(5000)
    for data, digest in ((config, config_digest), (layer, layer_digest)):
        assert run(net, pusher.push_blob("team/app", digest, len(data), Source(data))) is True

    body = manifest_for(config_digest, layer_digest)
    error = run(
        net,
        pusher.push_manifest("team/app", "1.0", "application/vnd.oci.image.manifest.v1+json", body),
    )

    assert isinstance(error, PushFailed)
    assert "PUT of the manifest" in error.message
    assert "MANIFEST_BLOB_UNKNOWN" in error.message
    assert "not shared between its replicas" in error.message
    # A 4xx, so that clients show the message, which they do not for a 5xx.
    assert (error.status, error.code) == (400, "MANIFEST_BLOB_UNKNOWN")


def test_blob_unknown_for_a_blob_never_pushed_says_so():
    origin = FakeOrigin()
    net = OriginNetwork(origin)
    pusher = OriginPusher(registry(), net.agent, net.clock)
    _, missing = blob(100)
    body = manifest_for(missing)

    error = run(
        net,
        pusher.push_manifest("team/app", "1.0", "application/vnd.oci.image.manifest.v1+json", body),
    )

    assert isinstance(error, PushFailed)
    assert f"the origin has no blob {missing}" in error.message
    assert "replicas" not in error.message


def test_a_manifest_goes_after_its_blobs():
    origin = FakeOrigin()
    net = OriginNetwork(origin)
    pusher = OriginPusher(registry(), net.agent, net.clock)
    data, digest = blob(100)
    run(net, pusher.push_blob("team/app", digest, len(data), Source(data)))
    body = manifest_for(digest)

    assert (
        run(
            net,
            pusher.push_manifest(
                "team/app", "1.0", "application/vnd.oci.image.manifest.v1+json", body
            ),
        )
        is None
    )

    assert origin.manifests["1.0"] == body
    put = origin.requests("PUT")[-1]
    assert put.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"


def test_basic_credentials_are_sent_when_the_origin_asks():
    origin = FakeOrigin(basic=f"pusher:{PASSWORD}")
    net = OriginNetwork(origin)
    data, digest = blob(100 * KiB)
    pusher = OriginPusher(registry(credentials=CREDENTIALS), net.agent, net.clock)

    assert run(net, pusher.push_blob("team/app", digest, len(data), Source(data))) is True
    assert origin.blobs[str(digest)] == data
    # One 401, on the first request; every later one authenticates from the start.
    assert [s.status for s in origin.seen].count(401) == 1


def test_tokens_are_asked_for_with_the_push_scope(logged):
    origin = FakeOrigin(bearer=f"pusher:{PASSWORD}")
    net = OriginNetwork(origin)
    data, digest = blob(100 * KiB)
    pusher = OriginPusher(registry(credentials=CREDENTIALS), net.agent, net.clock)

    assert run(net, pusher.push_blob("team/app", digest, len(data), Source(data))) is True
    assert origin.scopes == ["repository:team/app:pull,push"]
    assert origin.blobs[str(digest)] == data
    # Neither the password nor the token is ever logged by txregistry.
    lines = texts([e for e in logged if e.get("log_namespace", "").startswith("txregistry")])
    assert lines and not any(PASSWORD in line or "push-token" in line for line in lines)


def test_credentials_the_origin_refuses_are_a_denied_with_the_step():
    origin = FakeOrigin(basic=f"pusher:{PASSWORD}")
    net = OriginNetwork(origin)
    data, digest = blob(100)
    wrong = Credentials("pusher", Secret("wrong"), "test")
    pusher = OriginPusher(registry(credentials=wrong), net.agent, net.clock)

    error = run(net, pusher.push_blob("team/app", digest, len(data), Source(data)))

    assert isinstance(error, PushFailed)
    assert error.status == 403 and error.code == "DENIED"
    assert "HEAD of the blob" in error.message and "HTTP 401" in error.message
    assert "wrong" not in error.message and PASSWORD not in error.message


class StallingPatches:
    """An agent on which every PATCH is sent and never answered."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def request(self, method, uri, headers=None, bodyProducer=None):
        if method == b"PATCH":
            return Deferred()
        return self.agent.request(method, uri, headers, bodyProducer)


def test_a_stalled_chunk_is_cut_after_body_timeout():
    origin = FakeOrigin()
    net = OriginNetwork(origin)
    data, digest = blob(100 * KiB)
    config = registry(body_timeout=30.0, resume_attempts=0)
    pusher = OriginPusher(config, StallingPatches(net.agent), net.clock)
    done = ensureDeferred(pusher.push_blob("team/app", digest, len(data), Source(data)))
    results: list[Any] = []
    done.addBoth(results.append)
    net.pump()
    net.clock.advance(29)
    assert results == []

    net.clock.advance(2)
    net.pump()

    assert results and isinstance(results[0].value, PushFailed)
    assert "PATCH of the chunk at offset 0" in results[0].value.message
    assert "no progress for 30s" in results[0].value.message
    # Nothing diagnosed: a 502, which the client may retry.
    assert (results[0].value.status, results[0].value.code) == (502, "UNAVAILABLE")
    assert not net.clock.getDelayedCalls()


def test_the_chunk_producer_waits_while_the_connection_is_paused():
    data = bytes(1 << 20)
    writes: list[int] = []

    class Consumer:
        def write(self, chunk: bytes) -> None:
            writes.append(len(chunk))
            producer.pauseProducing()

    producer = ChunkProducer(Source(data), 4096, 600 * KiB)
    finished = producer.startProducing(Consumer())
    assert writes == [READ_SIZE]
    producer.resumeProducing()
    producer.resumeProducing()
    assert writes == [READ_SIZE, READ_SIZE, 600 * KiB - 2 * READ_SIZE]
    producer.resumeProducing()
    assert finished.called and producer.sent == 600 * KiB


def test_round_sizes():
    assert near_round_size(100 * 1000 * 1000 - 1000) == 100 * 1000 * 1000
    assert near_round_size((100 << 20) - 4096) == 100 << 20
    assert near_round_size(77_000_000) is None


def test_an_origin_that_wants_credentials_the_registry_lacks_says_so():
    origin = FakeOrigin(basic=f"pusher:{PASSWORD}")
    net = OriginNetwork(origin)
    data, digest = blob(100)
    pusher = OriginPusher(registry(), net.agent, net.clock)

    error = run(net, pusher.push_blob("team/app", digest, len(data), Source(data)))

    assert isinstance(error, PushFailed) and error.status == 403
    assert "the registry has none: set username and password_file" in error.message


def test_a_mount_the_origin_does_opens_no_upload():
    origin = FakeOrigin()
    net = OriginNetwork(origin)
    pusher = OriginPusher(registry(), net.agent, net.clock)

    # The fake origin cannot mount: it opens an upload, which is cancelled.
    _, digest = blob(100)
    assert run(net, pusher.mount("team/app", digest, "team/base")) is False
    assert origin.uploads == {}
    assert [s.method for s in origin.seen] == ["POST", "DELETE"]
    assert "mount=sha256" in origin.seen[0].path.replace("%3A", ":")


def test_a_chunk_the_origin_answers_416_resumes_from_its_status():
    # The origin already holds 10 KiB more than the last answer said (a
    # PATCH whose answer was lost): the next chunk gets 416, and the push
    # goes on from the offset it reports.
    origin = FakeOrigin()
    net = OriginNetwork(origin)
    data, digest = blob(150 * KiB)
    pusher = OriginPusher(registry(chunk=64 * KiB), net.agent, net.clock)
    real_patch = origin._upload

    def patch_and_add(request, method, repository, upload, url, body, headers):
        result = real_patch(request, method, repository, upload, url, body, headers)
        if method == b"PATCH" and len(origin.requests("PATCH")) == 1:
            origin.uploads[upload].extend(data[64 * KiB : 74 * KiB])
        return result

    origin._upload = patch_and_add

    assert run(net, pusher.push_blob("team/app", digest, len(data), Source(data))) is True

    assert origin.blobs[str(digest)] == data
    statuses = [(s.headers.get("content-range"), s.status) for s in origin.requests("PATCH")]
    assert statuses[1] == ("65536-131071", 416)
    assert statuses[2][0] == "75776-141311"
