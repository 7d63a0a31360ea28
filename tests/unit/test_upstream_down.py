"""
Serving while the upstream is slow, missing things, or down, in memory on a
Clock: one upstream request for many clients, answers from a download in
flight, stale tags, negative caching, offline mode and its admin switch.
"""

import json
import os

import pytest
from harness.memory import OCI_MANIFEST, MemoryRegistry
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from txregistry.config import MirrorConfig, RegistryConfig
from txregistry.http.admin import AdminResource
from txregistry.http.routing import Router

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
BLOB = os.urandom(200_000)


@pytest.fixture
def registry(tmp_path):
    return MemoryRegistry(tmp_path, tag_ttl=300, negative_ttl=15)


def refuse_everything(registry):
    registry.agent.refused.add("registry-1.docker.io")


class TestOneUpstreamRequest:
    def test_concurrent_manifest_requests_share_one_upstream_request(self, registry):
        registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
        held = []
        registry.upstream.hooks.append(lambda r: held.append(r) or NOT_DONE_YET)
        clients = [registry.client() for _ in range(5)]
        for client in clients:
            client.send("GET", "/v2/alpine/manifests/1")
        assert len(held) == 1
        registry.upstream.hooks.clear()
        request = held[0]
        request.setHeader(b"Content-Type", OCI_MANIFEST.encode())
        request.setHeader(
            b"Docker-Content-Digest",
            registry.upstream.tags[("library/alpine", "1")].encode(),
        )
        request.write(MANIFEST)
        request.finish()
        registry.pump()
        assert [c.response().body for c in clients] == [MANIFEST] * 5
        assert registry.cache.joins == 4

    def test_head_on_a_blob_in_flight_is_answered_from_the_upstream_headers(self, registry):
        digest = registry.upstream.add_blob(BLOB)
        held = registry.upstream.hold_blob(digest)
        registry.client().send("GET", f"/v2/alpine/blobs/{digest}")
        head = registry.head(f"/v2/alpine/blobs/{digest}")
        assert (head.status, head.headers["content-length"], head.headers["x-cache"]) == (
            200,
            str(len(BLOB)),
            "MISS",
        )
        assert registry.upstream.requests("HEAD") == [] and len(held) == 1

    def test_range_inside_received_bytes_is_served_and_beyond_waits(self, registry):
        digest = registry.upstream.add_blob(BLOB)
        held = registry.upstream.hold_blob(digest)
        registry.client().send("GET", f"/v2/alpine/blobs/{digest}")
        held[0].write(BLOB[:100_000])
        registry.pump()
        inside = registry.get(f"/v2/alpine/blobs/{digest}", {"Range": "bytes=1000-49999"})
        assert (inside.status, inside.body, inside.complete) == (206, BLOB[1000:50000], True)
        assert inside.headers["content-range"] == f"bytes 1000-49999/{len(BLOB)}"
        beyond = registry.client()
        beyond.send("GET", f"/v2/alpine/blobs/{digest}", {"Range": "bytes=150000-"})
        assert beyond.transport.value() == b"", "waits for bytes not yet received"
        held[0].write(BLOB[100_000:])
        held[0].finish()
        registry.pump()
        assert beyond.response().body == BLOB[150_000:] and beyond.response().complete
        assert len(held) == 1


class TestStaleTags:
    def test_expired_tag_is_served_stale_when_every_mirror_fails(self, registry, logs):
        registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
        registry.get("/v2/alpine/manifests/1")
        registry.clock.advance(600)
        refuse_everything(registry)
        response = registry.get("/v2/alpine/manifests/1")
        assert (response.status, response.body, response.headers["x-cache"]) == (
            200,
            MANIFEST,
            "STALE",
        )
        head = registry.head("/v2/alpine/manifests/1")
        assert (head.status, head.headers["x-cache"]) == (200, "STALE")
        assert logs.matching("serving stale docker.io/library/alpine:1: last confirmed 600s ago")

    def test_expired_tag_is_served_stale_when_rate_limited(self, registry):
        registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
        registry.get("/v2/alpine/manifests/1")
        registry.clock.advance(600)

        def limited(request):
            request.setResponseCode(429)
            return b"{}"

        registry.upstream.hooks.append(limited)
        assert registry.get("/v2/alpine/manifests/1").headers["x-cache"] == "STALE"

    def test_refused_credentials_are_not_papered_over(self, registry):
        registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
        registry.get("/v2/alpine/manifests/1")
        registry.clock.advance(600)

        def denied(request):
            request.setResponseCode(403)
            return b"{}"

        registry.upstream.hooks.append(denied)
        assert registry.get("/v2/alpine/manifests/1").status == 403

    def test_uncached_tag_with_the_upstream_down_is_502(self, registry):
        refuse_everything(registry)
        assert registry.get("/v2/alpine/manifests/1").status == 502


class TestNegativeCaching:
    def test_missing_tag_is_remembered_for_negative_ttl(self, registry):
        assert registry.get("/v2/alpine/manifests/nope").status == 404
        registry.clock.advance(14.9)
        remembered = registry.get("/v2/alpine/manifests/nope")
        assert remembered.status == 404
        assert remembered.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert len(registry.upstream.seen) == 1
        registry.clock.advance(0.1)
        registry.upstream.add_manifest("library/alpine", "nope", MANIFEST)
        assert registry.get("/v2/alpine/manifests/nope").status == 200
        assert len(registry.upstream.seen) == 2


def offline_registry(tmp_path):
    hub = RegistryConfig(
        "docker.io", (MirrorConfig("https://registry-1.docker.io"),), default=True, offline=True
    )
    return MemoryRegistry(tmp_path, registries=[hub], tag_ttl=300)


class TestOffline:
    def test_offline_serves_only_the_cache_and_asks_nothing(self, tmp_path):
        registry = offline_registry(tmp_path)
        upstream = registry.upstreams["docker.io"]
        upstream.offline = False
        registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
        digest = registry.upstream.add_blob(BLOB)
        registry.get("/v2/alpine/manifests/1")
        registry.get(f"/v2/alpine/blobs/{digest}")
        upstream.offline = True
        asked = len(registry.agent.sent)
        registry.clock.advance(600)

        stale = registry.get("/v2/alpine/manifests/1")
        assert (stale.status, stale.body, stale.headers["x-cache"]) == (200, MANIFEST, "STALE")
        blob = registry.get(f"/v2/alpine/blobs/{digest}")
        assert (blob.body, blob.headers["x-cache"]) == (BLOB, "HIT")
        missing = registry.get("/v2/alpine/manifests/2")
        assert missing.status == 503
        message = (
            "registry docker.io is in offline mode, and library/alpine:2 is not in the cache"
            " (an admin can switch it back: POST /admin/registries/docker.io/online)"
        )
        assert missing.json()["errors"][0]["message"] == message
        # The Go clients print a 5xx's status line, not its body.
        assert missing.reason == message
        assert registry.get(f"/v2/alpine/blobs/sha256:{'0' * 64}").status == 503
        assert len(registry.agent.sent) == asked

    def test_admin_switches_offline_mode_at_runtime(self, tmp_path):
        hub = RegistryConfig(
            "docker.io",
            (MirrorConfig("https://registry-1.docker.io"),),
            aliases=("index.docker.io",),
            default=True,
        )
        registry = MemoryRegistry(tmp_path, registries=[hub])
        admin = AdminResource(Router(registry.registries), registry.upstreams)

        def call(method, path):
            request = DummyRequest(path.strip("/").split("/"))
            request.method = method
            request.path = path.encode()
            body = admin.render(request)
            return request.responseCode or 200, json.loads(body)

        assert call(b"POST", "/admin/registries/index.docker.io/offline") == (
            200,
            {"registry": "docker.io", "offline": True},
        )
        assert registry.get("/v2/alpine/manifests/1").status == 503
        assert registry.agent.sent == []
        assert call(b"GET", "/admin/registries") == (
            200,
            {"registries": {"docker.io": {"offline": True}}},
        )
        assert call(b"POST", "/admin/registries/docker.io/online")[1]["offline"] is False
        registry.get("/v2/alpine/manifests/1")
        assert len(registry.agent.sent) == 1
        assert call(b"POST", "/admin/registries/quay.io/offline")[0] == 404
        assert call(b"GET", "/admin/registries/docker.io/offline")[0] == 405

    def test_admin_requests_are_not_served_on_the_registry_listener(self, registry):
        for method in ("GET", "POST"):
            response = registry.get("/admin/registries/docker.io/offline", method=method)
            assert response.status in (404, 405)
        assert registry.upstreams["docker.io"].offline is False
