"""
Push-through with real parts: distribution with htpasswd auth behind a real
nginx with a 100 MiB body limit and unbuffered request bodies, and an
nginx TLS terminator that does not pass X-Forwarded-Proto.  The 256 MiB
layer is generated as it is sent, never held in memory.
"""

from __future__ import annotations

import base64
import io
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from harness.cdn import CdnOrigin
from harness.images import big_image, small_image, write_layout
from harness.skopeo import check_pulled
from twisted.internet import reactor
from twisted.internet.task import LoopingCall

from txregistry.cli.doctor_push import GeneratedBlob, doctor_push
from txregistry.config import CacheConfig, Config, Credentials, MirrorConfig, RegistryConfig, Secret
from txregistry.upstream.dns import ExplainingResolver
from txregistry.upstream.endpoints import registry_agent
from txregistry.upstream.push import OriginPusher, PushFailed

pytestmark = pytest.mark.integration

USER, PASSWORD = "pusher", "cdn-Passw0rd!"
CREDENTIALS = Credentials(USER, Secret(PASSWORD), "test")


@pytest.fixture(scope="module")
def cdn(tmp_path_factory, ca) -> Iterator[CdnOrigin]:
    origin = CdnOrigin(tmp_path_factory.mktemp("cdn"), ca, USER, PASSWORD)
    try:
        yield origin
    finally:
        origin.stop()


def origin_registry(url: str, ca=None, **keys) -> RegistryConfig:
    return RegistryConfig(
        "registry.example.com",
        (MirrorConfig(url),),
        push=True,
        credentials=CREDENTIALS,
        ca_file=ca.cert_path if ca is not None else None,
        **keys,
    )


def resident() -> int:
    """This process's resident memory, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def pusher_for(registry: RegistryConfig) -> OriginPusher:
    resolver = ExplainingResolver.for_reactor(reactor)
    return OriginPusher(registry, registry_agent(reactor, resolver, registry), reactor)


def origin_head(cdn: CdnOrigin, repository: str, digest: str) -> tuple[int, int]:
    """The origin's own answer to a HEAD of a blob, asked directly."""
    request = urllib.request.Request(
        f"{cdn.registry.url}/v2/{repository}/blobs/{digest}", method="HEAD"
    )
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request) as response:
        return response.status, int(response.headers["Content-Length"])


@pytest_twisted.ensureDeferred
async def test_a_256_mib_layer_pushes_through_a_100_mib_body_limit(cdn):
    registry = origin_registry(cdn.limited_url)
    layer = GeneratedBlob(256 << 20)
    start = cdn.registry.mark()
    baseline = resident()
    peaks = [baseline]
    sampler = LoopingCall(lambda: peaks.append(resident()))
    sampler.start(0.05)

    try:
        pusher = pusher_for(registry)
        uploaded = await pusher.push_blob("team/app", layer.digest, layer.size, layer)
    finally:
        sampler.stop()

    assert uploaded is True
    assert origin_head(cdn, "team/app", str(layer.digest)) == (200, 256 << 20)
    accesses = cdn.registry.accesses(start)
    patches = [a for a in accesses if a.method == "PATCH"]
    # 50 MiB chunks: five whole ones and the 6 MiB rest, every one accepted.
    assert [a.status for a in patches] == [202] * 6
    assert [a.status for a in accesses if a.method == "PUT"] == [201]
    # Streamed: the 256 MiB never sat in memory, nor did a 50 MiB chunk.
    assert max(peaks) - baseline < 32 << 20, (baseline, max(peaks))


@pytest_twisted.ensureDeferred
async def test_a_chunk_size_above_the_limit_fails_with_the_body_limit_diagnosis(cdn):
    registry = origin_registry(cdn.limited_url, push_chunk_size=128 << 20)
    layer = GeneratedBlob(160 << 20)

    with pytest.raises(PushFailed) as caught:
        await pusher_for(registry).push_blob("team/app", layer.digest, layer.size, layer)

    message = caught.value.message
    assert "PATCH of the chunk at offset 0 (128MiB)" in message
    assert "HTTP 413" in message
    assert "likely cause: a proxy or CDN in front of the registry limits request bodies" in message
    assert "lower push_chunk_size (now 128MiB)" in message
    assert PASSWORD not in message


@pytest_twisted.ensureDeferred
async def test_a_location_switched_to_http_by_a_tls_terminator_is_refused(cdn, ca):
    registry = origin_registry(cdn.tls_url, ca)
    layer = GeneratedBlob(3 << 20)

    with pytest.raises(PushFailed) as caught:
        await pusher_for(registry).push_blob("team/app", layer.digest, layer.size, layer)

    message = caught.value.message
    assert "POST (starting the upload)" in message
    assert re.search(r"its Location http://127\.0\.0\.1:\d+/v2/team/app/blobs/uploads/", message)
    assert "switches from https to http: refused, not followed" in message
    assert "X-Forwarded-Proto" in message


def config_for(tmp_path, registry: RegistryConfig) -> Config:
    return Config(cache=CacheConfig(tmp_path / "cache"), registries=(registry,))


@pytest_twisted.ensureDeferred
async def test_doctor_push_reports_each_step_and_cleans_up(cdn, tmp_path):
    config = config_for(tmp_path, origin_registry(cdn.limited_url))
    out = io.StringIO()

    code = await doctor_push(reactor, config, "registry.example.com/team/doctor", out)

    text = out.getvalue()
    assert code == 0, text
    assert "ok    small blob" in text
    assert "ok    large blob (51MiB, more than push_chunk_size)" in text
    assert "PATCH chunk at offset 52428800, 1048576 bytes" in text
    assert "ok    manifest (txregistry-doctor)" in text
    assert "DELETE manifest: deleted" in text
    assert "DELETE large blob: deleted" in text
    assert "conclusion: ok" in text


@pytest_twisted.ensureDeferred
async def test_doctor_push_names_the_failed_step_and_the_cause(cdn, ca, tmp_path):
    config = config_for(tmp_path, origin_registry(cdn.tls_url, ca))
    out = io.StringIO()

    code = await doctor_push(reactor, config, "registry.example.com/team/doctor", out)

    text = out.getvalue()
    assert code == 1, text
    assert "FAIL  small blob" in text
    assert "conclusion: the push failed at the small blob" in text
    assert "X-Forwarded-Proto" in text


@pytest_twisted.ensureDeferred
async def test_doctor_push_with_chunks_above_the_limit(cdn, tmp_path):
    registry = origin_registry(cdn.limited_url, push_chunk_size=120 << 20)
    out = io.StringIO()

    code = await doctor_push(reactor, config_for(tmp_path, registry), "registry.example.com", out)

    text = out.getvalue()
    assert code == 1, text
    assert "ok    small blob" in text
    assert "FAIL  large blob (121MiB, more than push_chunk_size)" in text
    assert "lower push_chunk_size (now 120MiB)" in text


def origin_manifest(cdn: CdnOrigin, repository: str, reference: str) -> tuple[int, str]:
    """The origin's own answer to a HEAD of a manifest: status and digest."""
    request = urllib.request.Request(
        f"{cdn.registry.url}/v2/{repository}/manifests/{reference}", method="HEAD"
    )
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Accept", "application/vnd.oci.image.manifest.v1+json")
    with urllib.request.urlopen(request) as response:
        return response.status, response.headers["Docker-Content-Digest"]


@pytest_twisted.ensureDeferred
async def test_skopeo_pushes_through_txregistry_to_the_origin_and_pulls_back_a_hit(
    cdn, skopeo, start_txregistry, tmp_path
):
    # Chunks of 2 MiB, so that the 5 MiB layer goes in three.
    registry = origin_registry(cdn.limited_url, push_chunk_size=2 << 20)
    tx = start_txregistry(registry)
    layout = tmp_path / "layout"
    write_layout(layout, "t", [big_image(5 << 20, seed=12)])
    start = cdn.registry.mark()

    await skopeo.run_async(
        "copy",
        "--dest-tls-verify=false",
        "--digestfile",
        str(tmp_path / "digest"),
        f"oci:{layout}:t",
        f"docker://{tx.host}/registry.example.com/team/pushed:1",
    )

    # skopeo compresses the layer on the way: the digest is what it pushed.
    pushed = (tmp_path / "digest").read_text().strip()
    assert origin_manifest(cdn, "team/pushed", "1") == (200, pushed)
    accesses = cdn.registry.accesses(start)
    assert len([a for a in accesses if a.method == "PATCH" and a.status == 202]) >= 3
    # What was pushed is in the cache: pulling it back asks the origin for no blob.
    mark = cdn.registry.mark()
    pulled = await skopeo.pull(f"{tx.host}/registry.example.com/team/pushed:1", tmp_path / "pulled")
    assert check_pulled(pulled, pushed)
    assert cdn.registry.blob_gets(mark) == []
    assert [a for a in cdn.registry.accesses(mark) if "/manifests/" in a.path] == []


@pytest_twisted.ensureDeferred
async def test_a_failed_push_through_is_the_clients_error_with_the_diagnosis(
    cdn, ca, skopeo, start_txregistry, tmp_path
):
    tx = start_txregistry(origin_registry(cdn.tls_url, ca))
    layout = tmp_path / "layout"
    write_layout(layout, "t", [small_image(14)])

    with pytest.raises(AssertionError) as caught:
        await skopeo.run_async(
            "copy",
            "--retry-times=0",
            "--dest-tls-verify=false",
            f"oci:{layout}:t",
            f"docker://{tx.host}/registry.example.com/team/refused:1",
        )

    text = str(caught.value)
    assert "switches from https to http: refused, not followed" in text
    assert "X-Forwarded-Proto" in text


@pytest_twisted.ensureDeferred
async def test_a_token_registry_gives_a_push_token_for_the_registrys_credentials(
    login_token_upstream,
):
    from conftest import PASSWORD as TOKEN_PASSWORD
    from conftest import USER as TOKEN_USER

    registry = RegistryConfig(
        "token.example",
        (MirrorConfig(login_token_upstream.url),),
        push=True,
        credentials=Credentials(TOKEN_USER, Secret(TOKEN_PASSWORD), "test"),
        push_chunk_size=1 << 20,
    )
    layer = GeneratedBlob(3 << 20)
    token_server = login_token_upstream.token_server
    assert token_server is not None
    since = len(token_server.lines)

    uploaded = await pusher_for(registry).push_blob("team/tokened", layer.digest, layer.size, layer)

    assert uploaded is True
    issued = [line for line in token_server.lines[since:] if line.startswith("TOKEN ")]
    assert issued == [
        f"TOKEN scope=repository:team/tokened:pull,push service=test-registry user={TOKEN_USER}"
    ]
