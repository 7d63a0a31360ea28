"""
One tag answer for every client, with real parts: a distribution registry
upstream, skopeo, and the requests Docker, containerd and curl make, with
the Accept headers they send (L{harness.accept}), in the order they make
them.
"""

import json
import signal
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted
import treq
from conftest import push_images
from harness.accept import (
    CONTAINERD,
    CURL,
    DOCKER,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SKOPEO,
    containerd_fetch,
)
from harness.registry import DistributionRegistry, hub
from harness.skopeo import check_pulled
from harness.twistd import start_in_front_of
from twisted.web.http_headers import Headers

from txregistry.oci.reference import Digest
from txregistry.storage.disk import DiskStorage
from txregistry.storage.interface import StoredManifest, TagEntry
from txregistry.storage.runner import run_inline

pytestmark = pytest.mark.integration


async def ask(tx, method, path, accept=None):
    """One request to txregistry; C{accept} a list is sent as one line each."""
    headers = Headers()
    if accept is not None:
        headers.setRawHeaders("Accept", [accept] if isinstance(accept, str) else accept)
    response = await treq.request(method, f"{tx.url}{path}", headers=headers)
    body = await response.content()
    return response, body


def header(response, name):
    return response.headers.getRawHeaders(name, [None])[0]


async def pull_as(tx, repository, tag, resolve_accept, fetch_accept):
    """
    Pull an image as Docker and containerd do: HEAD the tag, GET its
    manifest by digest, then GET the config and layers.  Returns the
    X-Cache of the HEAD and of the manifest GET, and the digest.
    """
    head, _ = await ask(tx, "HEAD", f"/v2/{repository}/manifests/{tag}", resolve_accept)
    assert head.code == 200, head.code
    digest = header(head, "docker-content-digest")
    media_type = header(head, "content-type")
    manifest, body = await ask(
        tx, "GET", f"/v2/{repository}/manifests/{digest}", fetch_accept(media_type)
    )
    assert manifest.code == 200 and str(Digest.of(body)) == digest
    document = json.loads(body)
    for descriptor in [document["config"], *document["layers"]]:
        blob, data = await ask(tx, "GET", f"/v2/{repository}/blobs/{descriptor['digest']}")
        assert blob.code == 200 and str(Digest.of(data)) == descriptor["digest"]
    return header(head, "x-cache"), header(manifest, "x-cache"), digest


def as_docker(tx, repository, tag):
    return pull_as(tx, repository, tag, DOCKER, lambda media_type: DOCKER)


def as_containerd(tx, repository, tag):
    return pull_as(tx, repository, tag, CONTAINERD, containerd_fetch)


def manifest_requests(registry, since):
    return [
        (a.method, a.path)
        for a in registry.accesses(since)
        if "/manifests/" in a.path and "marker" not in a.path
    ]


@pytest_twisted.ensureDeferred
async def test_docker_containerd_skopeo_and_curl_share_one_tag_answer(
    upstream, start_txregistry, skopeo, tmp_path
):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["multi"]
    mark = upstream.registry.mark()
    docker, _ = await ask(tx, "HEAD", "/v2/library/multi/manifests/v1", DOCKER)
    assert (header(docker, "x-cache"), header(docker, "content-type")) == ("MISS", OCI_INDEX)
    assert header(docker, "docker-content-digest") == image.digest

    resolved, _ = await ask(tx, "HEAD", "/v2/library/multi/manifests/v1", CONTAINERD)
    fetched, index = await ask(
        tx, "GET", f"/v2/library/multi/manifests/{image.digest}", containerd_fetch(OCI_INDEX)
    )
    curl, curl_body = await ask(tx, "GET", "/v2/library/multi/manifests/v1", CURL)
    # Docker's HEAD taught txregistry the tag; the index's bytes come once, by digest.
    assert [header(r, "x-cache") for r in (resolved, fetched, curl)] == ["HIT", "MISS", "HIT"]
    assert str(Digest.of(index)) == image.digest and curl_body == index
    pulled = await skopeo.pull(f"{tx.host}/library/multi:v1", tmp_path / "pulled", "--all")
    check_pulled(pulled, image.digest)

    upstream.registry.mark()
    asked = manifest_requests(upstream.registry, mark)
    assert [a for a in asked if a[1].endswith("/manifests/v1")] == [
        ("HEAD", "/v2/library/multi/manifests/v1")
    ]
    assert asked.count(("GET", f"/v2/library/multi/manifests/{image.digest}")) == 1


@pytest_twisted.ensureDeferred
async def test_what_docker_pulled_serves_every_client_when_the_upstream_is_down(
    start_txregistry, skopeo, tmp_path
):
    registry = DistributionRegistry(tmp_path / "upstream").start()
    try:
        image = push_images(skopeo, tmp_path / "layouts", registry, names=("small",))["small"]
        # A txregistry whose tag answers are still fresh, and one whose
        # tag_ttl has run out by the next request.
        fresh = start_txregistry(hub(registry.url), tag_ttl=300)
        expired = start_txregistry(hub(registry.url), tag_ttl=0)
        for tx in (fresh, expired):
            assert await as_docker(tx, "library/small", "v1") == ("MISS", "MISS", image.digest)
    finally:
        registry.stop()

    assert await as_containerd(fresh, "library/small", "v1") == ("HIT", "HIT", image.digest)
    assert await as_containerd(expired, "library/small", "v1") == ("STALE", "HIT", image.digest)
    for tx, expected in ((fresh, "HIT"), (expired, "STALE")):
        curl, body = await ask(tx, "GET", "/v2/library/small/manifests/v1", CURL)
        assert (curl.code, header(curl, "x-cache"), str(Digest.of(body))) == (
            200,
            expected,
            image.digest,
        )
        pulled = await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / f"pulled-{expected}")
        check_pulled(pulled, image.digest)


@pytest.mark.parametrize("accept", [CURL, "application/*", None], ids=["curl", "type", "none"])
@pytest_twisted.ensureDeferred
async def test_wildcards_and_no_accept_get_an_oci_manifest(upstream, start_txregistry, accept):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["small"]
    for expected in ("MISS", "HIT"):
        response, body = await ask(tx, "GET", "/v2/library/small/manifests/v1", accept)
        assert (response.code, header(response, "x-cache")) == (200, expected)
        assert header(response, "content-type") == OCI_MANIFEST
        assert str(Digest.of(body)) == image.digest
    by_digest, body = await ask(tx, "GET", f"/v2/library/small/manifests/{image.digest}", accept)
    assert by_digest.code == 200 and str(Digest.of(body)) == image.digest


@pytest_twisted.ensureDeferred
async def test_a_404_for_the_accept_header_says_why_and_is_not_remembered(
    upstream, start_txregistry, skopeo, tmp_path
):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["small"]
    refused, body = await ask(tx, "GET", "/v2/library/small/manifests/v1", DOCKER_MANIFEST)
    assert refused.code == 404
    (error,) = json.loads(body)["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["message"] == (
        f"docker.io/library/small:v1 is {OCI_MANIFEST}, which the request's Accept header"
        f" ('{DOCKER_MANIFEST}') does not include, and the upstream has nothing else for it:"
        f" accept {OCI_MANIFEST}, or pull {image.digest}"
    )
    skopeo_pull = await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / "pulled")
    check_pulled(skopeo_pull, image.digest)
    accepted, _ = await ask(tx, "HEAD", "/v2/library/small/manifests/v1", SKOPEO)
    assert header(accepted, "x-cache") == "HIT"


def test_tag_answers_from_the_earlier_layout_survive_an_upgrade(tmp_path, skopeo):
    """
    A cache written by the earlier layout, then twistd started on it with
    the upstream down: the answer Docker got is served to containerd, and
    one asked with */* (which distribution answers with a conversion or a
    404) is not served at all.
    """
    registry = DistributionRegistry(tmp_path / "upstream").start()
    try:
        image = push_images(skopeo, tmp_path / "layouts", registry, names=("small",))["small"]
        body = urllib.request.urlopen(
            urllib.request.Request(
                f"{registry.url}/v2/library/small/manifests/v1", headers={"Accept": OCI_MANIFEST}
            )
        ).read()
    finally:
        registry.stop()
    storage = DiskStorage(tmp_path / "cache", 1 << 30, run_inline)
    storage.start()
    digest = Digest.parse(image.digest)
    storage.put_manifest(digest, StoredManifest(OCI_MANIFEST, body))
    types = ",".join(sorted(t.lower() for t in DOCKER))
    an_hour_ago = time.time() - 3600
    entry = TagEntry(image.digest, OCI_MANIFEST, len(body), an_hour_ago)
    storage.put_tag(f"docker.io/library/small:v1#{types}", entry)
    storage.put_tag(f"docker.io/library/small:v2#{CURL}", entry)
    storage.stop()

    process, _, port = start_in_front_of(tmp_path, registry.url)
    try:
        process.wait_for("tag answers in the earlier layout: 1 kept, 1 dropped")
        said = [line for line in process.lines if "earlier layout" in line or "ready" in line]
        assert "earlier layout" in said[0] and said[-1].endswith("txregistry ready")

        def head(tag):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/library/small/manifests/{tag}",
                method="HEAD",
                headers={"Accept": CONTAINERD},
            )
            try:
                with urllib.request.urlopen(request) as response:
                    return response.status, response.headers
            except urllib.error.HTTPError as e:
                return e.code, e.headers

        status, headers = head("v1")
        assert (status, headers["X-Cache"], headers["Docker-Content-Digest"]) == (
            200,
            "STALE",
            image.digest,
        )
        assert head("v2")[0] == 502
    finally:
        process.signal(signal.SIGTERM)
        process.wait_exit()
