"""
Pulling through txregistry, in memory: cache decisions, headers, errors.

Each test drives txregistry's real resource, cache and store against an
in-memory upstream (L{FakeRegistry}), with a L{Clock} for tag TTLs.
"""

import json
import os

import pytest
from harness.memory import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeRegistry,
    MemoryRegistry,
)

from txregistry.config import MirrorConfig, RegistryConfig, UpstreamConfig
from txregistry.oci.reference import Digest

MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}, indent=3
).encode()
ACCEPT_ALL = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST}"


@pytest.fixture
def registry(tmp_path):
    return MemoryRegistry(tmp_path, tag_ttl=300)


def test_v2_base_and_health(registry):
    response = registry.get("/v2/")
    assert (response.status, response.body) == (200, b"{}")
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert registry.get("/health").json() == {"status": "ok"}
    assert registry.upstream.seen == []


class TestManifests:
    def test_tag_miss_then_hit_within_ttl(self, registry):
        digest = registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        first = registry.get("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        assert (first.status, first.body) == (200, MANIFEST)
        assert first.headers["x-cache"] == "MISS"
        assert first.headers["docker-content-digest"] == digest
        assert first.headers["content-type"] == OCI_MANIFEST
        assert first.headers["content-length"] == str(len(MANIFEST))
        # The upstream is asked for every type, the Docker list too.
        sent = registry.upstream.requests("GET")[0].headers["accept"]
        assert DOCKER_LIST in sent and all(t in sent for t in ACCEPT_ALL.split(", "))

        registry.clock.advance(299)
        second = registry.get("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        assert (second.status, second.body, second.headers["x-cache"]) == (200, MANIFEST, "HIT")
        assert second.headers["docker-content-digest"] == digest
        assert len(registry.upstream.seen) == 1

    def test_expired_tag_is_revalidated_with_head_and_stays_a_hit(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        registry.get("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        registry.clock.advance(300)
        response = registry.get("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        assert (response.body, response.headers["x-cache"]) == (MANIFEST, "HIT")
        assert [s.method for s in registry.upstream.seen] == ["GET", "HEAD"]
        # The HEAD refreshed the entry: another TTL without asking.
        registry.clock.advance(299)
        registry.get("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        assert len(registry.upstream.seen) == 2

    def test_moved_tag_is_fetched_again(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        registry.get("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        moved = MANIFEST.replace(b"[]", b"[ ]")
        new_digest = registry.upstream.add_manifest("library/alpine", "3.20", moved)
        registry.clock.advance(301)
        response = registry.get("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        assert (response.body, response.headers["x-cache"]) == (moved, "MISS")
        assert response.headers["docker-content-digest"] == new_digest
        assert [s.method for s in registry.upstream.seen] == ["GET", "HEAD", "GET"]

    def test_exact_bytes_and_type_are_kept_for_docker_schema2(self, registry):
        body = b'{\n  "schemaVersion": 2,\n  "mediaType": "' + DOCKER_MANIFEST.encode() + b'"\n}\n'
        digest = registry.upstream.add_manifest("library/old", "v1", body, DOCKER_MANIFEST)
        response = registry.get("/v2/old/manifests/v1", {"Accept": DOCKER_MANIFEST})
        assert (response.body, response.headers["content-type"]) == (body, DOCKER_MANIFEST)
        assert str(Digest.of(response.body)) == digest

    def test_head_by_tag_has_headers_and_no_body(self, registry):
        digest = registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        response = registry.head("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        assert (response.status, response.body) == (200, b"")
        assert response.headers["docker-content-digest"] == digest
        assert response.headers["content-length"] == str(len(MANIFEST))
        assert response.headers["content-type"] == OCI_MANIFEST
        assert response.headers["x-cache"] == "MISS"
        assert [s.method for s in registry.upstream.seen] == ["HEAD"]
        # The HEAD taught us what the tag means; its GET fetches by digest.
        get = registry.get("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        assert (get.body, get.headers["x-cache"]) == (MANIFEST, "MISS")
        assert registry.upstream.seen[-1].path.endswith(f"/manifests/{digest}")
        head = registry.head("/v2/alpine/manifests/3.20", {"Accept": ACCEPT_ALL})
        assert (head.headers["x-cache"], head.headers["docker-content-digest"]) == ("HIT", digest)
        assert len(registry.upstream.seen) == 2

    def test_by_digest_is_served_from_cache_without_asking(self, registry):
        digest = registry.upstream.add_manifest("library/alpine", None, MANIFEST)
        first = registry.get(f"/v2/alpine/manifests/{digest}")
        assert (first.body, first.headers["x-cache"]) == (MANIFEST, "MISS")
        registry.clock.advance(10**6)
        second = registry.get(f"/v2/library/alpine/manifests/{digest}")
        head = registry.head(f"/v2/alpine/manifests/{digest}")
        assert (second.body, second.headers["x-cache"]) == (MANIFEST, "HIT")
        assert (head.headers["x-cache"], head.headers["content-length"]) == (
            "HIT",
            str(len(MANIFEST)),
        )
        assert len(registry.upstream.seen) == 1

    def test_manifest_not_matching_its_digest_is_refused_and_not_cached(self, registry):
        digest = str(Digest.of(MANIFEST))
        registry.upstream.manifests[digest] = (OCI_MANIFEST, MANIFEST + b" ")
        response = registry.get(f"/v2/alpine/manifests/{digest}")
        assert response.status == 502
        (error,) = response.json()["errors"]
        assert error["code"] == "UNAVAILABLE"
        assert "manifest content has digest" in error["message"]
        registry.upstream.manifests[digest] = (OCI_MANIFEST, MANIFEST)
        assert registry.get(f"/v2/alpine/manifests/{digest}").headers["x-cache"] == "MISS"

    def test_tag_whose_content_contradicts_docker_content_digest_is_refused(self, registry):
        registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
        digest = str(Digest.of(MANIFEST))
        registry.upstream.manifests[digest] = (OCI_MANIFEST, b"{}")
        response = registry.get("/v2/alpine/manifests/1")
        assert response.status == 502
        assert registry.storage.get_manifest(Digest.parse(digest)).result is None

    def test_client_without_accept_gets_modern_types_asked_for(self, registry):
        registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
        registry.get("/v2/alpine/manifests/1")
        accept = registry.upstream.seen[0].headers["accept"]
        assert OCI_INDEX in accept and DOCKER_MANIFEST in accept

    def test_unknown_manifest_is_manifest_unknown(self, registry):
        response = registry.get("/v2/alpine/manifests/nope")
        assert response.status == 404
        assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    def test_path_prefix_and_ns_routing_reach_the_same_upstream_name(self, tmp_path):
        ghcr = RegistryConfig("ghcr.io", (MirrorConfig("https://ghcr.io"),))
        hub = RegistryConfig(
            "docker.io", (MirrorConfig("https://registry-1.docker.io"),), default=True
        )
        registry = MemoryRegistry(tmp_path, registries=[hub, ghcr])
        registry.upstream.add_manifest("org/tool", "v1", MANIFEST)
        by_prefix = registry.get("/v2/ghcr.io/org/tool/manifests/v1")
        by_ns = registry.get("/v2/org/tool/manifests/v1?ns=ghcr.io")
        assert by_prefix.status == by_ns.status == 200
        assert {s.path for s in registry.upstream.seen} == {"/v2/org/tool/manifests/v1"}
        assert by_ns.headers["x-cache"] == "HIT"


class TestBlobs:
    def test_miss_then_hit(self, registry):
        blob = os.urandom(300_000)
        digest = registry.upstream.add_blob(blob)
        first = registry.get(f"/v2/library/alpine/blobs/{digest}")
        assert (first.status, first.body, first.complete) == (200, blob, True)
        assert first.headers["x-cache"] == "MISS"
        assert first.headers["content-length"] == str(len(blob))
        assert first.headers["docker-content-digest"] == digest
        assert first.headers["content-type"] == "application/octet-stream"
        second = registry.get(f"/v2/library/alpine/blobs/{digest}")
        assert (second.body, second.headers["x-cache"]) == (blob, "HIT")
        assert len(registry.upstream.requests("GET", "/blobs/")) == 1
        # Content is shared by digest across repositories.
        other = registry.get(f"/v2/other/repo/blobs/{digest}")
        assert (other.body, other.headers["x-cache"]) == (blob, "HIT")

    def test_a_fill_that_ends_during_a_slow_storage_lookup_is_not_fetched_again(self, registry):
        """
        A lookup held up (a bucket that retries) while another client's
        fill starts and commits: there is no fill left to follow when the
        lookup misses, and the blob is served from storage, not fetched again.
        """
        from twisted.internet.defer import Deferred

        blob = os.urandom(300_000)
        digest = registry.upstream.add_blob(blob)
        storage = registry.storage
        real_open = storage.open_blob
        held: list[Deferred] = []

        def open_blob(wanted, touch=True):
            if not held:
                slow: Deferred = Deferred()
                held.append(slow)
                return slow
            return real_open(wanted, touch)

        storage.open_blob = open_blob
        slow_client = registry.client()
        slow_client.send("GET", f"/v2/library/alpine/blobs/{digest}")
        assert held and slow_client.transport.value() == b""
        other = registry.get(f"/v2/library/alpine/blobs/{digest}")
        assert (other.status, other.body, other.headers["x-cache"]) == (200, blob, "MISS")
        held[0].callback(None)  # the slow lookup missed
        registry.pump()
        slow = slow_client.response()
        assert (slow.status, slow.body, slow.complete) == (200, blob, True)
        assert slow.headers["x-cache"] == "HIT"
        assert len(registry.upstream.requests("GET", "/blobs/")) == 1

    def test_head_miss_and_hit(self, registry):
        digest = registry.upstream.add_blob(b"x" * 1000)
        head = registry.head(f"/v2/alpine/blobs/{digest}")
        assert (head.status, head.headers["content-length"], head.headers["x-cache"]) == (
            200,
            "1000",
            "MISS",
        )
        registry.get(f"/v2/alpine/blobs/{digest}")
        head = registry.head(f"/v2/alpine/blobs/{digest}")
        assert (head.headers["content-length"], head.headers["x-cache"], head.body) == (
            "1000",
            "HIT",
            b"",
        )

    @pytest.mark.parametrize(
        "header, status, expected, content_range",
        [
            ("bytes=0-99", 206, slice(0, 100), "bytes 0-99/5000"),
            ("bytes=4900-", 206, slice(4900, 5000), "bytes 4900-4999/5000"),
            ("bytes=-10", 206, slice(4990, 5000), "bytes 4990-4999/5000"),
            ("bytes=4000-99999", 206, slice(4000, 5000), "bytes 4000-4999/5000"),
            ("bytes=0-1,5-6", 200, slice(0, 5000), None),
            ("items=0-1", 200, slice(0, 5000), None),
        ],
    )
    def test_ranges_on_a_hit(self, registry, header, status, expected, content_range):
        blob = os.urandom(5000)
        digest = registry.upstream.add_blob(blob)
        registry.get(f"/v2/alpine/blobs/{digest}")
        response = registry.get(f"/v2/alpine/blobs/{digest}", {"Range": header})
        assert (response.status, response.body) == (status, blob[expected])
        assert response.headers.get("content-range") == content_range
        assert response.headers["accept-ranges"] == "bytes"

    def test_unsatisfiable_range(self, registry):
        digest = registry.upstream.add_blob(b"abc")
        registry.get(f"/v2/alpine/blobs/{digest}")
        response = registry.get(f"/v2/alpine/blobs/{digest}", {"Range": "bytes=3-"})
        assert response.status == 416
        assert response.headers["content-range"] == "bytes */3"

    def test_miss_streams_before_the_blob_is_complete(self, registry):
        blob = os.urandom(200_000)
        client, held, _ = start_held_pull(registry, blob)
        held.write(blob[:80_000])
        registry.pump()
        partial = client.response()
        assert (partial.status, partial.headers["content-length"]) == (200, str(len(blob)))
        # All that arrived, but the last byte, which waits for the check.
        assert partial.body == blob[: 80_000 - 1] and not partial.complete
        held.write(blob[80_000:])
        held.finish()
        registry.pump()
        assert client.response().body == blob and client.response().complete

    def test_corrupt_blob_aborts_the_client_and_is_not_cached(self, registry):
        blob = os.urandom(100_000)
        client, held, digest = start_held_pull(registry, blob)
        held.write(blob[:50_000])
        held.write(blob[50_000:-1] + bytes([blob[-1] ^ 1]))
        held.finish()
        registry.pump()
        response = client.response()
        assert response.status == 200  # the status went out before the check
        assert response.aborted and not response.complete
        # The client never saw the last byte, so never a complete blob.
        assert response.body == blob[:-1]
        assert registry.storage.open_blob(Digest.parse(digest)).result is None
        assert list(registry.storage.tmp_directory.iterdir()) == []

    def test_cut_connection_without_resuming_aborts_the_client(self, tmp_path):
        no_resume = RegistryConfig(
            "docker.io",
            (MirrorConfig("https://registry-1.docker.io"),),
            default=True,
            upstream=UpstreamConfig(resume_attempts=0),
        )
        registry = MemoryRegistry(tmp_path, registries=[no_resume])
        blob = os.urandom(100_000)
        client, held, digest = start_held_pull(registry, blob)
        held.write(blob[:60_000])
        registry.pump()
        held.channel.transport.loseConnection()
        registry.pump()
        response = client.response()
        assert response.aborted and response.body == blob[: 60_000 - 1]
        assert registry.storage.open_blob(Digest.parse(digest)).result is None
        assert list(registry.storage.tmp_directory.iterdir()) == []

    def test_corrupt_blob_caught_before_answering_is_a_502(self, registry):
        blob = os.urandom(1000)
        digest = str(Digest.of(blob))
        registry.upstream.blobs[digest] = blob[:-1] + bytes([blob[-1] ^ 1])
        response = registry.get(f"/v2/alpine/blobs/{digest}")
        assert response.status == 502
        assert "upstream sent content with digest" in response.json()["errors"][0]["message"]
        registry.upstream.blobs[digest] = blob
        fixed = registry.get(f"/v2/alpine/blobs/{digest}")
        assert (fixed.body, fixed.headers["x-cache"]) == (blob, "MISS")

    def test_unknown_blob(self, registry):
        response = registry.get(f"/v2/alpine/blobs/sha256:{'0' * 64}")
        assert response.status == 404
        assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"

    def test_blob_larger_than_the_cache_is_streamed_uncached(self, tmp_path):
        registry = MemoryRegistry(tmp_path, size_limit=1000)
        blob = os.urandom(5000)
        digest = registry.upstream.add_blob(blob)
        for _ in range(2):
            response = registry.get(f"/v2/alpine/blobs/{digest}")
            assert (response.body, response.headers["x-cache"], response.complete) == (
                blob,
                "MISS",
                True,
            )
        assert len(registry.upstream.requests("GET", "/blobs/")) == 2


class TestUpstreamErrors:
    def test_rate_limit_is_passed_on_with_retry_after(self, registry):
        def limited(request):
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", b"120")
            return json.dumps(
                {
                    "errors": [
                        {
                            "code": "TOOMANYREQUESTS",
                            "message": "You have reached your pull rate limit.",
                        }
                    ]
                }
            ).encode()

        registry.upstream.hooks.append(limited)
        response = registry.get("/v2/alpine/manifests/latest")
        assert (response.status, response.headers["retry-after"]) == (429, "120")
        (error,) = response.json()["errors"]
        assert error["code"] == "TOOMANYREQUESTS"
        assert "pull rate limit" in error["message"]

    @pytest.mark.parametrize("status, code", [(401, "UNAUTHORIZED"), (403, "DENIED")])
    def test_refusals_are_passed_on(self, registry, status, code):
        def refuse(request):
            request.setResponseCode(status)
            return b"{}"

        registry.upstream.hooks.append(refuse)
        response = registry.get("/v2/private/img/manifests/latest")
        assert response.status == status
        assert response.json()["errors"][0]["code"] == code
        assert "www-authenticate" not in response.headers

    def test_unreachable_upstream_says_which_and_why(self, tmp_path):
        dead = RegistryConfig("docker.io", (MirrorConfig("http://10.0.0.1:1"),), default=True)
        registry = MemoryRegistry(tmp_path, registries=[dead])
        registry.agent.refused.add("10.0.0.1")
        response = registry.get("/v2/alpine/manifests/latest")
        assert response.status == 502
        (error,) = response.json()["errors"]
        assert error["code"] == "UNAVAILABLE"
        assert "http://10.0.0.1:1: connection refused" in error["message"]
        assert error["detail"]["mirrors"][0]["mirror"] == "http://10.0.0.1:1"

    def test_upstream_5xx_is_502(self, registry):
        registry.upstream.hooks.append(lambda request: request.setResponseCode(503) or b"down")
        response = registry.get(f"/v2/alpine/blobs/sha256:{'1' * 64}")
        assert response.status == 502
        assert "HTTP 503" in response.json()["errors"][0]["message"]


def start_held_pull(registry, blob):
    """
    Start a client's GET of C{blob} whose upstream response sends only its
    headers; return the client, the upstream request to write the body to,
    and the digest.
    """
    digest = registry.upstream.add_blob(blob)
    requests = registry.upstream.hold_blob(digest)
    client = registry.client()
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    (held,) = requests
    return client, held, digest


class TestTokenAuth:
    def test_bearer_challenge_is_answered_and_token_reused(self, tmp_path):
        upstream = FakeRegistry(require_token=True)
        registry = MemoryRegistry(tmp_path, upstream)
        blob_digest = upstream.add_blob(b"layer")
        upstream.add_manifest("library/alpine", "1", MANIFEST)
        assert registry.get("/v2/alpine/manifests/1").status == 200
        assert registry.get(f"/v2/alpine/blobs/{blob_digest}").body == b"layer"
        assert upstream.tokens_issued == ["token-0"]
        token_requests = upstream.requests(contains="/token")
        assert (
            token_requests[0].path
            == "/token?service=fake&scope=repository%3Alibrary%2Falpine%3Apull"
        )
        # After the first 401, later requests carry the token from the start.
        assert [s.headers.get("authorization") for s in upstream.requests(contains="/v2/")] == [
            None,
            "Bearer token-0",
            "Bearer token-0",
        ]

    def test_expired_token_is_replaced(self, tmp_path):
        upstream = FakeRegistry(require_token=True, token_lifetime=60)
        registry = MemoryRegistry(tmp_path, upstream)
        first, second = upstream.add_blob(b"1"), upstream.add_blob(b"2")
        registry.get(f"/v2/alpine/blobs/{first}")
        registry.clock.advance(60)
        assert registry.get(f"/v2/alpine/blobs/{second}").body == b"2"
        assert upstream.tokens_issued == ["token-0", "token-1"]

    def test_revoked_token_is_refreshed_once(self, tmp_path):
        upstream = FakeRegistry(require_token=True)
        registry = MemoryRegistry(tmp_path, upstream)
        first, second = upstream.add_blob(b"1"), upstream.add_blob(b"2")
        registry.get(f"/v2/alpine/blobs/{first}")
        upstream.tokens_issued[0] = "revoked"
        assert registry.get(f"/v2/alpine/blobs/{second}").body == b"2"
        assert len(upstream.tokens_issued) == 2


class TestPassThrough:
    def test_tags_list(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.19", MANIFEST)
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        response = registry.get("/v2/alpine/tags/list?n=10&last=3.0&evil=1")
        assert response.json() == {"name": "library/alpine", "tags": ["3.19", "3.20"]}
        assert registry.upstream.seen[-1].path == "/v2/library/alpine/tags/list?n=10&last=3.0"
        registry.get("/v2/alpine/tags/list")
        assert len(registry.upstream.seen) == 2  # never cached

    def test_referrers_with_artifact_type_filter(self, registry):
        subject = f"sha256:{'c' * 64}"
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()

        def referrers(request):
            if b"/referrers/" not in request.path:
                return None
            request.setHeader(b"Content-Type", OCI_INDEX.encode())
            request.setHeader(b"OCI-Filters-Applied", b"artifactType")
            return index

        registry.upstream.hooks.append(referrers)
        response = registry.get(
            f"/v2/alpine/referrers/{subject}?artifactType=application%2Fvnd.example.sbom"
        )
        assert (response.status, response.body) == (200, index)
        assert response.headers["content-type"] == OCI_INDEX
        assert response.headers["oci-filters-applied"] == "artifactType"
        assert registry.upstream.seen[-1].path == (
            f"/v2/library/alpine/referrers/{subject}?artifactType=application%2Fvnd.example.sbom"
        )

    def test_link_header_keeps_the_path_prefix(self, registry):
        def paged(request):
            request.setHeader(b"Link", b'</v2/library/alpine/tags/list?last=b&n=1>; rel="next"')
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"name":"library/alpine","tags":["b"]}'

        registry.upstream.hooks.append(paged)
        response = registry.get("/v2/docker.io/library/alpine/tags/list?n=1")
        assert (
            response.headers["link"]
            == '</v2/docker.io/library/alpine/tags/list?last=b&n=1>; rel="next"'
        )


class TestRefusedRequests:
    @pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
    def test_pushes_are_refused_with_an_explanation(self, registry, method):
        response = registry.get("/v2/alpine/blobs/uploads/", method=method)
        assert response.status == 403
        (error,) = response.json()["errors"]
        assert error["code"] == "DENIED" and "pull-through cache" in error["message"]
        assert "hosted = true" in error["message"] and "push = true" in error["message"]
        assert registry.upstream.seen == []

    def test_unconfigured_registry_makes_no_connection(self, registry):
        response = registry.get("/v2/org/img/manifests/1?ns=evil.example.com")
        assert response.status == 404
        assert response.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        assert registry.upstream.seen == []

    def test_tls_handshake_on_plain_port_is_closed_at_once(self, registry):
        client = registry.client()
        client.channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert client.transport.disconnected
        assert client.transport.value() == b""

    def test_internal_errors_are_json_without_traceback(self, registry, monkeypatch):
        async def explode(*args):
            raise ZeroDivisionError("secret internals")

        monkeypatch.setattr(registry.cache, "manifest", explode)
        response = registry.get("/v2/alpine/manifests/1")
        assert response.status == 500
        assert response.json()["errors"][0]["code"] == "UNKNOWN"
        assert b"Traceback" not in response.body and b"secret" not in response.body
