"""
What the pull API answers where the distribution spec is particular, in
memory: references that cannot exist, HEAD answers without bodies, invalid
ranges, refused methods and the ns scope.  tests/integration/test_spec.py
walks the same against a real distribution registry.
"""

import json
import os

import pytest
from harness.memory import OCI_MANIFEST, MemoryRegistry

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()


@pytest.fixture
def registry(tmp_path):
    return MemoryRegistry(tmp_path)


def bodies_eaten(logs):
    """Twisted's complaints that txregistry (not the fake upstream) gave a HEAD a body."""
    return [line for line in logs.matching("I think I'll eat it") if "RegistryResource" in line]


def raw_head(registry, path):
    """A HEAD's status line and headers, and whatever came after them."""
    client = registry.client()
    client.send("HEAD", path)
    raw = client.transport.value()
    _, _, after = raw.partition(b"\r\n\r\n")
    return client.response(), after


@pytest.mark.parametrize("reference", [".INVALID_MANIFEST_NAME", "-x", "a" * 129])
def test_a_reference_that_is_no_tag_or_digest_is_an_unknown_manifest(registry, reference, logs):
    got = registry.get(f"/v2/alpine/manifests/{reference}")
    assert got.status == 404
    (error,) = got.json()["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "is unknown in library/alpine: it is neither a tag nor a digest" in error["message"]
    head, after = raw_head(registry, f"/v2/alpine/manifests/{reference}")
    assert head.status == 404 and after == b""
    assert head.headers["content-length"] == str(len(got.body))
    assert registry.agent.sent == [], "no upstream was asked"
    assert not bodies_eaten(logs)


def test_a_bad_digest_stays_digest_invalid(registry):
    got = registry.get("/v2/alpine/manifests/sha256:baddigeststring")
    assert (got.status, got.json()["errors"][0]["code"]) == (400, "DIGEST_INVALID")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/",
        "/v2/alpine/manifests/missing",  # answered after the upstream's 404
        "/v2/alpine/manifests/sha256:" + "0" * 64,
        "/v2/alpine/blobs/sha256:" + "0" * 64,
        "/v2/alpine/blobs/not-a-digest",
        "/v2/Alpine/manifests/1",
        "/v2/quay.io/org/img/manifests/1",
        "/health",
    ],
)
def test_head_answers_have_the_gets_headers_and_no_body(registry, path, logs):
    get = registry.get(path)
    head, after = raw_head(registry, path)
    assert after == b""
    assert head.status == get.status
    # The length of the body a GET would get (an error's message may differ
    # between the two: the upstream was asked twice).
    assert int(head.headers["content-length"]) > 0
    assert head.headers["content-type"] == get.headers["content-type"]
    assert not bodies_eaten(logs)


def test_a_range_that_ends_before_it_starts_is_not_satisfiable(registry):
    digest = registry.upstream.add_blob(os.urandom(5000))
    for _ in range(2):  # a miss, then a hit
        answer = registry.get(f"/v2/alpine/blobs/{digest}", {"Range": "bytes=500-0"})
        assert answer.status == 416
        assert answer.headers["content-range"] == "bytes */5000"


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_refused_methods_say_which_are_allowed(registry, method):
    answer = registry.get("/v2/", method=method)
    assert answer.status == 405
    assert answer.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert answer.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_pushes_to_a_pull_through_registry_are_denied(registry, method):
    # 403, not 405: Docker retries a 405 (goharbor/harbor#12731).
    for path in ("/v2/alpine/manifests/1", "/v2/alpine/blobs/uploads/"):
        answer = registry.get(path, method=method)
        assert answer.status == 403
        assert answer.json()["errors"][0]["code"] == "DENIED"
    assert registry.upstream.seen == []


def test_an_unknown_api_path_is_404_with_a_code_of_the_spec(registry):
    answer = registry.get("/v2/alpine/nothing/1")
    assert (answer.status, answer.json()["errors"][0]["code"]) == (404, "UNSUPPORTED")


def test_a_request_scoped_by_ns_says_so(registry):
    registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
    scoped = registry.get("/v2/alpine/manifests/1?ns=docker.io")
    assert scoped.status == 200 and scoped.headers["oci-namespace"] == "docker.io"
    # Chosen by the path, or by default: no ns, no header.
    for path in ("/v2/docker.io/library/alpine/manifests/1", "/v2/alpine/manifests/1"):
        assert "oci-namespace" not in registry.get(path).headers
