"""
One answer per tag, for every client that can use it, in memory: the real
clients' own C{Accept} headers (L{harness.accept}), an upstream that treats
C{Accept} as distribution does, and a Clock for C{tag_ttl}.
"""

import json

import pytest
from harness.accept import (
    CONTAINERD,
    CURL,
    DOCKER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1,
    SCHEMA1_SIGNED,
    SKOPEO,
    containerd_fetch,
)
from harness.memory import MemoryRegistry
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET

from txregistry.oci.mediatypes import MANIFEST_TYPES, Accepted
from txregistry.oci.reference import Digest
from txregistry.storage.interface import StoredManifest, TagEntry

INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 2}],
    }
).encode()
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
DOCKER_BODY = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []}).encode()
LIST = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": []}).encode()
TAG = "/v2/alpine/manifests/3.20"


@pytest.fixture
def registry(tmp_path):
    return MemoryRegistry(tmp_path, tag_ttl=300, negative_ttl=15)


def down(registry):
    registry.agent.refused.add("registry-1.docker.io")


def upstream_requests(registry):
    """What txregistry asked the upstream: method and path."""
    return [(s.method, s.path.removeprefix("/v2/library/alpine/")) for s in registry.upstream.seen]


class TestWhatAnAcceptHeaderAccepts:
    @pytest.mark.parametrize(
        "header",
        [", ".join(SKOPEO), CONTAINERD, ", ".join(DOCKER), CURL, "application/*", ""],
        ids=["skopeo", "containerd", "docker", "curl", "application/*", "none"],
    )
    def test_every_client_accepts_every_manifest_and_index_type(self, header):
        accepted = Accepted(header.encode())
        assert [accepted.accepts(t) for t in MANIFEST_TYPES] == [True] * 4

    def test_parameters_and_case_do_not_matter(self):
        accepted = Accepted(b"Application/VND.OCI.Image.Index.v1+json; q=0.5")
        assert accepted.accepts(OCI_INDEX + "; charset=utf-8")
        assert not accepted.accepts(OCI_MANIFEST)

    def test_q0_refuses_and_the_most_specific_entry_decides(self):
        accepted = Accepted(f"*/*, {OCI_INDEX};q=0, text/*;q=0".encode())
        assert not accepted.accepts(OCI_INDEX)
        assert accepted.accepts(OCI_MANIFEST)
        assert not accepted.accepts("text/plain")

    def test_a_client_that_names_only_single_manifests_does_not_accept_an_index(self):
        accepted = Accepted(DOCKER_MANIFEST.encode())
        assert accepted.accepts(DOCKER_MANIFEST)
        assert not accepted.accepts(OCI_INDEX) and not accepted.accepts(DOCKER_LIST)
        assert accepted.named_types == (DOCKER_MANIFEST,)


class TestOneAnswerForEveryClient:
    def test_the_upstream_is_asked_for_every_type_whatever_the_client_sent(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        response = registry.get(TAG, {"Accept": CURL})
        assert (response.status, response.body, response.headers["x-cache"]) == (
            200,
            MANIFEST,
            "MISS",
        )
        sent = registry.upstream.seen[0].headers["accept"]
        assert sorted(t.strip() for t in sent.split(",")) == sorted(MANIFEST_TYPES)

    def test_docker_containerd_skopeo_and_curl_share_one_answer(self, registry):
        digest = registry.upstream.add_manifest("library/alpine", "3.20", INDEX, OCI_INDEX)
        # Docker resolves with a HEAD, then GETs the manifest by digest.
        docker = registry.head(TAG, {"Accept": DOCKER})
        assert (docker.status, docker.headers["docker-content-digest"]) == (200, digest)
        assert docker.headers["content-type"] == OCI_INDEX
        registry.get(f"/v2/alpine/manifests/{digest}", {"Accept": DOCKER})
        asked = upstream_requests(registry)
        assert asked == [("HEAD", "manifests/3.20"), ("GET", f"manifests/{digest}")]

        containerd = registry.head(TAG, {"Accept": CONTAINERD})
        by_digest = registry.get(
            f"/v2/alpine/manifests/{digest}", {"Accept": containerd_fetch(OCI_INDEX)}
        )
        skopeo = registry.get(TAG, {"Accept": SKOPEO})
        curl = registry.get(TAG, {"Accept": CURL})
        bare = registry.get(TAG)
        assert [r.headers["x-cache"] for r in (containerd, by_digest, skopeo, curl, bare)] == [
            "HIT"
        ] * 5
        assert {r.headers["docker-content-digest"] for r in (containerd, skopeo, curl)} == {digest}
        assert skopeo.body == curl.body == bare.body == INDEX
        assert upstream_requests(registry) == asked

    def test_curl_gets_an_oci_manifest_by_digest(self, registry):
        digest = registry.upstream.add_manifest("library/alpine", None, MANIFEST)
        response = registry.get(f"/v2/alpine/manifests/{digest}", {"Accept": CURL})
        assert (response.status, response.body) == (200, MANIFEST)

    def test_concurrent_clients_with_different_accept_make_one_upstream_request(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        held = []
        registry.upstream.hooks.append(lambda request: held.append(request) or NOT_DONE_YET)
        for accept in (SKOPEO, CURL, DOCKER):
            registry.client().send("GET", TAG, {"Accept": accept})
        assert len(held) == 1
        assert registry.cache.joins == 2


class TestUpstreamDown:
    def test_what_docker_pulled_an_hour_ago_is_served_stale_to_everyone(self, registry):
        digest = registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        registry.head(TAG, {"Accept": DOCKER})
        registry.get(f"/v2/alpine/manifests/{digest}", {"Accept": DOCKER})
        registry.clock.advance(3600)
        down(registry)

        containerd = registry.head(TAG, {"Accept": CONTAINERD})
        assert (containerd.status, containerd.headers["x-cache"]) == (200, "STALE")
        assert containerd.headers["docker-content-digest"] == digest
        fetch = registry.get(
            f"/v2/alpine/manifests/{digest}", {"Accept": containerd_fetch(OCI_MANIFEST)}
        )
        assert (fetch.status, fetch.body, fetch.headers["x-cache"]) == (200, MANIFEST, "HIT")
        for accept in (SKOPEO, CURL):
            stale = registry.get(TAG, {"Accept": accept})
            assert (stale.status, stale.body, stale.headers["x-cache"]) == (200, MANIFEST, "STALE")

    def test_a_blip_within_tag_ttl_does_not_reach_a_second_client(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        registry.get(TAG, {"Accept": SKOPEO})
        registry.clock.advance(299)
        down(registry)
        asked = len(registry.agent.sent)
        for accept in (CONTAINERD, DOCKER, CURL):
            response = registry.head(TAG, {"Accept": accept})
            assert (response.status, response.headers["x-cache"]) == (200, "HIT")
        assert len(registry.agent.sent) == asked


class TestRevalidation:
    def test_after_tag_ttl_one_head_serves_every_client_and_no_body_is_fetched(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        registry.get(TAG, {"Accept": SKOPEO})
        registry.clock.advance(300)
        containerd = registry.head(TAG, {"Accept": CONTAINERD})
        docker = registry.head(TAG, {"Accept": DOCKER})
        curl = registry.get(TAG, {"Accept": CURL})
        assert [r.headers["x-cache"] for r in (containerd, docker, curl)] == ["HIT"] * 3
        assert curl.body == MANIFEST
        assert upstream_requests(registry) == [
            ("GET", "manifests/3.20"),
            ("HEAD", "manifests/3.20"),
        ]

    def test_a_moved_tag_is_fetched_again_for_the_next_client(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        registry.get(TAG, {"Accept": SKOPEO})
        moved = registry.upstream.add_manifest(
            "library/alpine", "3.20", DOCKER_BODY, DOCKER_MANIFEST
        )
        registry.clock.advance(300)
        docker = registry.get(TAG, {"Accept": DOCKER})
        assert (docker.body, docker.headers["x-cache"]) == (DOCKER_BODY, "MISS")
        assert docker.headers["docker-content-digest"] == moved
        assert registry.get(TAG, {"Accept": CURL}).headers["x-cache"] == "HIT"


class TestAClientThatAcceptsNeither:
    def test_it_gets_what_the_upstream_answers_its_own_accept(self, registry):
        tagged = registry.upstream.add_manifest("library/alpine", "3.20", LIST, DOCKER_LIST)
        amd64 = registry.upstream.add_manifest("library/alpine", None, DOCKER_BODY, DOCKER_MANIFEST)
        registry.upstream.list_rewrites[("library/alpine", "3.20")] = amd64
        old = registry.get(TAG, {"Accept": [DOCKER_MANIFEST, SCHEMA1_SIGNED, SCHEMA1]})
        assert (old.status, old.body, old.headers["docker-content-digest"]) == (
            200,
            DOCKER_BODY,
            amd64,
        )
        sent = registry.upstream.seen[-1].headers["accept"]
        assert sent == f"{DOCKER_MANIFEST}, {SCHEMA1_SIGNED}, {SCHEMA1}"
        # The tag's answer is still the list, for everyone else.
        skopeo = registry.get(TAG, {"Accept": SKOPEO})
        assert (skopeo.body, skopeo.headers["x-cache"]) == (LIST, "HIT")
        assert skopeo.headers["docker-content-digest"] == tagged

    def test_a_head_is_answered_from_the_upstreams_headers(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", LIST, DOCKER_LIST)
        amd64 = registry.upstream.add_manifest("library/alpine", None, DOCKER_BODY, DOCKER_MANIFEST)
        registry.upstream.list_rewrites[("library/alpine", "3.20")] = amd64
        head = registry.head(TAG, {"Accept": DOCKER_MANIFEST})
        assert (head.status, head.headers["docker-content-digest"]) == (200, amd64)
        assert (head.headers["content-type"], head.headers["x-cache"]) == (DOCKER_MANIFEST, "MISS")
        assert upstream_requests(registry) == [("HEAD", "manifests/3.20")] * 2

    def test_offline_it_is_told_what_is_cached(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", INDEX, OCI_INDEX)
        registry.get(TAG, {"Accept": SKOPEO})
        registry.upstreams["docker.io"].offline = True
        response = registry.get(TAG, {"Accept": DOCKER_MANIFEST})
        assert response.status == 503
        assert response.json()["errors"][0]["message"] == (
            "registry docker.io is in offline mode, and library/alpine:3.20 is cached only as"
            f" {OCI_INDEX}, which the request's Accept header ('{DOCKER_MANIFEST}') does not"
            " include (an admin can switch it back: POST /admin/registries/docker.io/online)"
        )
        assert registry.get(TAG, {"Accept": CURL}).headers["x-cache"] == "HIT"

    def test_a_404_for_its_accept_says_why_and_is_not_remembered(self, registry, logs):
        digest = registry.upstream.add_manifest("library/alpine", "3.20", INDEX, OCI_INDEX)
        refused = registry.get(TAG, {"Accept": DOCKER_MANIFEST})
        assert refused.status == 404
        (error,) = refused.json()["errors"]
        assert error["code"] == "MANIFEST_UNKNOWN"
        assert error["message"] == (
            f"docker.io/library/alpine:3.20 is {OCI_INDEX}, which the request's Accept header"
            f" ('{DOCKER_MANIFEST}') does not include, and the upstream has nothing else for"
            f" it: accept {OCI_INDEX}, or pull {digest}"
        )
        assert logs.matching(f"docker.io/library/alpine:3.20 is {OCI_INDEX}, which the client's")
        # Not "no such tag": the next client, a second later, gets it.
        registry.clock.advance(1)
        skopeo = registry.get(TAG, {"Accept": SKOPEO})
        assert (skopeo.status, skopeo.body, skopeo.headers["x-cache"]) == (200, INDEX, "HIT")


class TestNotFound:
    def test_a_404_the_upstream_gave_for_the_accept_header_is_not_remembered(self, registry):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)

        def refuse_for_accept(request):
            request.setResponseCode(404)
            return json.dumps(
                {
                    "errors": [
                        {
                            "code": "MANIFEST_UNKNOWN",
                            "message": "OCI manifest found, but accept header does not"
                            " support OCI manifests",
                        }
                    ]
                }
            ).encode()

        registry.upstream.hooks.append(refuse_for_accept)
        assert registry.get(TAG, {"Accept": CURL}).status == 404
        registry.upstream.hooks.clear()
        registry.clock.advance(1)
        assert registry.get(TAG, {"Accept": CURL}).status == 200

    def test_a_missing_tag_is_remembered_once_for_every_client(self, registry):
        assert registry.get(TAG, {"Accept": SKOPEO}).status == 404
        for accept in (CONTAINERD, DOCKER, CURL):
            remembered = registry.head(TAG, {"Accept": accept})
            assert remembered.status == 404
        assert len(registry.upstream.seen) == 1


class TestTagAnswersFromTheEarlierLayout:
    def legacy_key(self, tag, types):
        return f"docker.io/library/alpine:{tag}#{','.join(sorted(types))}"

    def test_answers_asked_with_every_type_are_kept_the_others_dropped(self, registry, logs):
        now = registry.clock.seconds()
        storage = registry.storage
        digest = registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        storage.put_manifest(Digest.parse(digest), StoredManifest(OCI_MANIFEST, MANIFEST))
        entry = TagEntry(digest, OCI_MANIFEST, len(MANIFEST), now - 3600)
        older = TagEntry("sha256:" + "1" * 64, OCI_MANIFEST, 5, now - 7200)
        converted = TagEntry("sha256:" + "2" * 64, SCHEMA1_SIGNED, 5, now - 60)
        storage.put_tag(self.legacy_key("3.20", SKOPEO), entry)
        storage.put_tag(self.legacy_key("3.20", DOCKER), older)
        storage.put_tag(self.legacy_key("3.20", [CURL]), converted)
        storage.put_tag(self.legacy_key("edge", [DOCKER_MANIFEST]), converted)

        Deferred.fromCoroutine(registry.cache.migrate_tag_answers())
        assert sorted(storage.entries("tag").result) == [
            "docker.io/library/alpine:3.20",
        ]
        assert logs.matching("tag answers in the earlier layout: 1 kept, 2 dropped")
        down(registry)
        for accept in (CONTAINERD, CURL):
            stale = registry.head(TAG, {"Accept": accept})
            assert (stale.headers["x-cache"], stale.headers["docker-content-digest"]) == (
                "STALE",
                digest,
            )
        assert registry.get("/v2/alpine/manifests/edge", {"Accept": DOCKER_MANIFEST}).status == 502

    def test_nothing_to_do_says_nothing(self, registry, logs):
        registry.upstream.add_manifest("library/alpine", "3.20", MANIFEST)
        registry.get(TAG)
        Deferred.fromCoroutine(registry.cache.migrate_tag_answers())
        assert registry.storage.entries("tag").result == ["docker.io/library/alpine:3.20"]
        assert not logs.matching("earlier layout")
