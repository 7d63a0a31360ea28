"""
Downloads that are cut, stall or trickle, in memory on a Clock: each is
resumed from the byte already received, and every client sees one
uninterrupted stream; only when resuming fails are clients aborted.
"""

import os

import pytest
from harness.memory import BufferedTransport, FakeRegistry, MemoryRegistry

from txregistry.config import MirrorConfig, RegistryConfig, UpstreamConfig
from txregistry.oci.reference import Digest

BLOB = os.urandom(300_000)


def registry_with(tmp_path, mirrors=("https://registry-1.docker.io",), hosts=None, **upstream):
    config = RegistryConfig(
        "docker.io",
        tuple(MirrorConfig(m) for m in mirrors),
        default=True,
        upstream=UpstreamConfig(**upstream),
    )
    return MemoryRegistry(tmp_path, registries=[config], hosts=hosts or {})


def start(registry, upstream=None):
    """A client's GET of BLOB, its upstream response held for the test to write."""
    upstream = upstream or registry.upstream
    digest = upstream.add_blob(BLOB)
    held = upstream.hold_blob(digest)
    client = registry.client()
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    return client, held, digest


def cut(registry, request):
    request.channel.transport.loseConnection()
    registry.pump()


def cached(registry, digest):
    return registry.storage.open_blob(Digest.parse(digest)).result is not None


def test_cut_download_resumes_with_a_range_from_the_same_mirror(tmp_path, logs):
    registry = registry_with(tmp_path)
    client, held, digest = start(registry)
    held[0].write(BLOB[:100_000])
    registry.pump()
    cut(registry, held[0])
    assert len(held) == 2
    assert held[1].getHeader(b"range") == b"bytes=100000-"
    held[1].write(BLOB[100_000:])
    held[1].finish()
    registry.pump()
    response = client.response()
    assert (response.status, response.body, response.complete, response.aborted) == (
        200,
        BLOB,
        True,
        False,
    )
    assert cached(registry, digest)
    assert logs.matching("cut after 100000 bytes")
    assert logs.matching("resuming, attempt 1 of 3")


def test_mirror_that_ignores_the_range_has_the_start_skipped(tmp_path):
    registry = registry_with(tmp_path)
    registry.upstream.honor_range = False
    client, held, digest = start(registry)
    held[0].write(BLOB[:120_000])
    registry.pump()
    cut(registry, held[0])
    held[1].write(BLOB)
    held[1].finish()
    registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


def test_resume_moves_on_to_the_next_mirror(tmp_path):
    a, b = FakeRegistry(), FakeRegistry()
    registry = registry_with(
        tmp_path, ("https://a.test", "https://b.test"), {"a.test": a, "b.test": b}
    )
    b.add_blob(BLOB)
    client, held, digest = start(registry, a)
    held[0].write(BLOB[:50_000])
    registry.pump()
    registry.agent.refused.add("a.test")
    cut(registry, held[0])
    resumed = [s for s in registry.agent.to("b.test") if "blobs" in s.url]
    assert [s.headers.get("range") for s in resumed] == ["bytes=50000-"]
    response = client.response()
    assert response.body == BLOB and response.complete
    assert cached(registry, digest)


def test_when_resuming_fails_clients_are_aborted_and_nothing_is_cached(tmp_path):
    registry = registry_with(tmp_path, resume_attempts=2)
    client, held, digest = start(registry)
    for request, end in enumerate((40_000, 80_000, 120_000)):
        held[request].write(BLOB[end - 40_000 : end])
        registry.pump()
        cut(registry, held[request])
    assert len(held) == 3  # the first try, then two resumes
    response = client.response()
    assert response.aborted and not response.complete
    assert response.body == BLOB[: 120_000 - 1]
    assert not cached(registry, digest)
    assert list(registry.storage.tmp_directory.iterdir()) == []


def test_resume_at_the_wrong_offset_counts_as_a_failed_attempt(tmp_path):
    registry = registry_with(tmp_path, resume_attempts=1)
    client, held, digest = start(registry)
    held[0].write(BLOB[:10_000])
    registry.pump()

    def wrong_range(request):
        if request.getHeader(b"range"):
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", f"bytes 0-{len(BLOB) - 1}/{len(BLOB)}".encode())
            return BLOB
        return None

    registry.upstream.hooks.insert(0, wrong_range)
    cut(registry, held[0])
    assert client.response().aborted and not cached(registry, digest)


def test_stalled_download_is_cut_after_body_timeout_and_resumed(tmp_path, logs):
    registry = registry_with(tmp_path, body_timeout=30.0)
    client, held, digest = start(registry)
    held[0].write(BLOB[:70_000])
    registry.pump()
    registry.clock.advance(29.9)
    registry.pump()
    assert len(held) == 1
    registry.clock.advance(0.1)
    registry.pump()
    assert len(held) == 2 and held[1].getHeader(b"range") == b"bytes=70000-"
    assert logs.matching("nothing received for 30.0s")
    held[1].write(BLOB[70_000:])
    held[1].finish()
    registry.pump()
    assert client.response().body == BLOB and cached(registry, digest)


def test_trickling_download_is_not_a_stall(tmp_path):
    registry = registry_with(tmp_path, body_timeout=30.0)
    client, held, digest = start(registry)
    pieces = [BLOB[i : i + 10_000] for i in range(0, len(BLOB), 10_000)]
    for piece in pieces[:-1]:
        held[0].write(piece)
        registry.pump()
        registry.clock.advance(29)
    held[0].write(pieces[-1])
    held[0].finish()
    registry.pump()
    assert len(held) == 1
    assert client.response().body == BLOB and cached(registry, digest)


def test_fill_goes_on_when_the_client_leaves(tmp_path):
    registry = registry_with(tmp_path)
    client, held, digest = start(registry)
    held[0].write(BLOB[:100_000])
    registry.pump()
    client.disconnect()
    held[0].write(BLOB[100_000:])
    held[0].finish()
    registry.pump()
    assert cached(registry, digest)
    assert registry.get(f"/v2/alpine/blobs/{digest}").headers["x-cache"] == "HIT"


def test_fill_can_be_set_to_stop_when_its_clients_leave(tmp_path):
    config = RegistryConfig(
        "docker.io", (MirrorConfig("https://registry-1.docker.io"),), default=True
    )
    registry = MemoryRegistry(tmp_path, registries=[config], fill_after_disconnect=False)
    client, held, digest = start(registry)
    held[0].write(BLOB[:100_000])
    registry.pump()
    client.disconnect()
    assert held[0]._disconnected, "the upstream download was stopped"
    assert not cached(registry, digest)
    assert list(registry.storage.tmp_directory.iterdir()) == []


@pytest.mark.parametrize("readers", [2, 5])
def test_one_download_many_readers_each_at_its_own_pace(tmp_path, readers):
    registry = registry_with(tmp_path)
    digest = registry.upstream.add_blob(BLOB)
    held = registry.upstream.hold_blob(digest)
    slow = BufferedTransport(64 * 1024)
    clients = [registry.client(slow)] + [registry.client() for _ in range(readers - 1)]
    clients[0].send("GET", f"/v2/alpine/blobs/{digest}")
    held[0].write(BLOB[:200_000])
    registry.pump()
    # A late client starts from byte 0, at once, with what has arrived.
    for client in clients[1:]:
        client.send("GET", f"/v2/alpine/blobs/{digest}")
        assert client.response().body == BLOB[: 200_000 - 1]
    held[0].write(BLOB[200_000:])
    held[0].finish()
    registry.pump()
    for client in clients[1:]:
        assert client.response().body == BLOB and client.response().complete
    assert slow.paused and not clients[0].response().complete  # still reading
    for _ in range(100):
        slow.drain()
    assert clients[0].response().body == BLOB
    assert len(registry.upstream.requests("GET", "/blobs/")) == 1
