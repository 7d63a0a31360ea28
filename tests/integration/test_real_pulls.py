"""
Pulling real images with skopeo through txregistry from a real distribution
registry, and checking digests and the upstream's access log.
"""

import json

import pytest
import pytest_twisted
import treq
from harness.registry import hub
from harness.skopeo import check_pulled, sha256_file

pytestmark = pytest.mark.integration


@pytest_twisted.ensureDeferred
async def test_oci_image_pulled_twice_downloads_each_blob_once(
    upstream, start_txregistry, skopeo, tmp_path
):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["small"]
    mark = upstream.registry.mark()

    first = await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / "first")
    blobs = check_pulled(first, image.digest)
    assert len(blobs) == 4  # three layers and a config
    after_first = upstream.registry.mark()
    assert sorted(upstream.registry.blob_gets(mark)) == sorted(blobs)

    second = await skopeo.pull(f"{tx.host}/small:v1", tmp_path / "second")
    check_pulled(second, image.digest)
    assert upstream.registry.blob_gets(after_first) == []
    # Within the tag TTL the second pull asked the upstream nothing at all.
    assert [a for a in upstream.registry.accesses(after_first) if "marker" not in a.path] == []


@pytest_twisted.ensureDeferred
async def test_docker_schema2_image_keeps_its_digest(upstream, start_txregistry, skopeo, tmp_path):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["docker"]
    pulled = await skopeo.pull(f"{tx.host}/library/docker:v1", tmp_path / "pulled")
    check_pulled(pulled, image.digest)
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


@pytest_twisted.ensureDeferred
async def test_multi_platform_index_with_all(upstream, start_txregistry, skopeo, tmp_path):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["multi"]
    pulled = await skopeo.pull(f"{tx.host}/library/multi:v1", tmp_path / "pulled", "--all")
    check_pulled(pulled, image.digest)
    index = json.loads((pulled / "manifest.json").read_text())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    platforms = set()
    for entry in index["manifests"]:
        instance = pulled / (entry["digest"].split(":")[1] + ".manifest.json")
        assert sha256_file(instance) == entry["digest"]
        platforms.add(entry["platform"]["architecture"])
    assert platforms == {"amd64", "arm64"}


@pytest_twisted.ensureDeferred
async def test_large_layer_is_verified_and_cached(upstream, start_txregistry, skopeo, tmp_path):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["big"]
    first = await skopeo.pull(f"{tx.host}/library/big:v1", tmp_path / "first")
    blobs = check_pulled(first, image.digest)
    sizes = sorted((first / d.split(":")[1]).stat().st_size for d in blobs)
    assert sizes[-1] >= 64 << 20
    mark = upstream.registry.mark()
    second = await skopeo.pull(f"{tx.host}/library/big:v1", tmp_path / "second")
    check_pulled(second, image.digest)
    assert upstream.registry.blob_gets(mark) == []


@pytest_twisted.ensureDeferred
async def test_token_auth_upstream(token_upstream, start_txregistry, skopeo, tmp_path):
    tx = start_txregistry(hub(token_upstream.url))
    image = token_upstream.images["small"]
    tokens_before = len(
        [line for line in token_upstream.token_server.lines if line.startswith("TOKEN")]
    )
    pulled = await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / "pulled")
    check_pulled(pulled, image.digest)
    token_lines = [line for line in token_upstream.token_server.lines if line.startswith("TOKEN")][
        tokens_before:
    ]
    # One token for the repository, reused for the manifest and every blob.
    assert token_lines == ["TOKEN scope=repository:library/small:pull service=test-registry user=-"]


@pytest_twisted.ensureDeferred
async def test_routing_by_ns_and_by_path_prefix(upstream, start_txregistry):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["small"]
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    by_ns = await treq.get(f"{tx.url}/v2/library/small/manifests/v1?ns=docker.io", headers=accept)
    by_prefix = await treq.get(f"{tx.url}/v2/docker.io/small/manifests/v1", headers=accept)
    unknown = await treq.get(f"{tx.url}/v2/library/small/manifests/v1?ns=quay.io")
    assert by_ns.code == by_prefix.code == 200
    assert by_ns.headers.getRawHeaders("docker-content-digest") == [image.digest]
    assert by_prefix.headers.getRawHeaders("x-cache") == ["HIT"]
    assert unknown.code == 404
    assert (await unknown.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    for response in (by_ns, by_prefix):
        await response.content()


@pytest_twisted.ensureDeferred
async def test_starting_contacts_no_upstream(upstream, start_txregistry):
    mark = upstream.registry.mark()
    tx = start_txregistry(hub(upstream.url))
    response = await treq.get(f"{tx.url}/v2/")
    assert response.code == 200
    await response.content()
    health = await treq.get(f"{tx.url}/health")
    assert (await health.json())["status"] == "ok"
    upstream.registry.mark()
    assert [a for a in upstream.registry.accesses(mark) if "marker" not in a.path] == []
