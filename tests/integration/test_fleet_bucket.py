"""
Fleet mode and the shared bucket together, with real parts: three
C{twistd txregistry} nodes on loopback, each with a local tier of its own,
all with C{backend = "s3"} on one bucket of a real Swift, as each other's
C{[fleet]} peers, in front of a real distribution registry through the
fault-injecting proxy (which counts the upstream requests and throttles).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
from harness.faults import Fault, FaultProxy
from harness.processes import Process
from harness.swift import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, botocore_client
from harness.twistd import free_port, start_node
from test_fleet_nodes import Node, by_rank, get, upstream_gets
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater

from txregistry.storage.s3 import object_key

pytestmark = pytest.mark.integration

# Guards against a hang; no test passes by waiting this long.
DEADLINE = 60.0


def bucket_tables(directory: Path, swift, prefix: str) -> str:
    """The C{[storage]} tables of a node on the test bucket, its keys in files of its own."""
    access, secret = directory / "s3-access-key", directory / "s3-secret-key"
    for path, text in ((access, ACCESS_KEY), (secret, SECRET_KEY)):
        path.write_text(text + "\n")
        path.chmod(0o600)
    return f"""
        tag_ttl = "5m"
        [storage]
        backend = "s3"
        [storage.s3]
        endpoint = "{swift.endpoint}"
        bucket = "{BUCKET}"
        prefix = "{prefix}"
        region = "{REGION}"
        access_key_file = "{access}"
        secret_key_file = "{secret}"
        """


def start_bucket_node(
    directory: Path, swift, prefix: str, upstream_url: str, url: str, peers: list[str]
) -> Process:
    directory.mkdir(parents=True, exist_ok=True)
    port = int(url.rsplit(":", 1)[1])
    tables = bucket_tables(directory, swift, prefix)
    return start_node(directory, port, upstream_url, url, peers, extra=tables)


@pytest.fixture
def prefix() -> str:
    """A bucket prefix of this test's own: the Swift server is shared by the session."""
    return f"fleet-{os.urandom(6).hex()}/"


@pytest.fixture
def fleet(tmp_path, proxy, swift, prefix) -> Iterator[list[Node]]:
    """Three nodes on one bucket, each with its own local tier, fetching through C{proxy}."""
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    nodes: list[Node] = []
    try:
        for i, url in enumerate(urls):
            process = start_bucket_node(tmp_path / f"node{i}", swift, prefix, proxy.url, url, urls)
            nodes.append(Node(url, process))
        yield nodes
    finally:
        for node in nodes:
            node.process.stop()


async def until(condition, what: str):
    """Poll C{condition()} (sync or a coroutine function) until it is truthy."""
    waited = 0.0
    while True:
        result = condition()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if waited > DEADLINE:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


def in_bucket(swift, key: str) -> list[int]:
    """The sizes of the objects listed under exactly C{key}."""
    listed = botocore_client(swift.endpoint).list_objects_v2(Bucket=BUCKET, Prefix=key)
    return [item["Size"] for item in listed.get("Contents", []) if item["Key"] == key]


async def health(url: str) -> dict:
    return json.loads(await (await treq.get(f"{url}/health")).content())


async def metrics(url: str) -> str:
    return (await (await treq.get(f"{url}/metrics")).content()).decode()


def metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


async def assert_no_keys_anywhere(urls: list[str], processes: list[Process]) -> None:
    """The S3 keys appear in no node's log, /health or /metrics."""
    for url in urls:
        everything = json.dumps(await health(url)) + await metrics(url)
        assert SECRET_KEY not in everything and ACCESS_KEY not in everything, url
    for process in processes:
        log = "\n".join(process.lines)
        assert "bucket" in log, "the node logged about its bucket"
        assert SECRET_KEY not in log and ACCESS_KEY not in log


def manifest_path(upstream) -> str:
    pushed = upstream.images["small"]
    return f"/v2/{pushed.repository}/manifests/{pushed.tag}"


def upstream_manifest_gets(proxy: FaultProxy) -> list[str]:
    return [r for r in proxy.requests_for("/manifests/") if not r.startswith("HEAD ")]


@pytest_twisted.ensureDeferred
async def test_eight_cold_clients_one_upstream_get_and_one_object_then_shared_tags(
    blob, upstream, proxy, swift, prefix, fleet
):
    digest, data = blob
    # Throttled, so that every client asks while the blob is still arriving.
    proxy.inject(Fault(f"/blobs/{digest}", "trickle", chunk=65536, interval=0.01))
    gets = [Deferred.fromCoroutine(get(fleet[i % 3].blob_url(digest))) for i in range(8)]
    results = await DeferredList(gets, fireOnOneErrback=True, consumeErrors=True)
    for _, (code, body, clean) in results:
        assert (code, clean) == (200, True)
        assert body == data
    assert upstream_gets(proxy, digest) == 1
    owner, *_ = by_rank(fleet, digest)
    owner.process.wait_for(f"stored {digest} in the bucket")
    key = object_key(prefix, "blob", digest)
    assert await until(lambda: in_bucket(swift, key), f"{key} in the bucket") == [len(data)]

    # A tag answer confirmed by one node is served by the others within
    # tag_ttl, without asking the upstream.
    path = manifest_path(upstream)
    response = await treq.get(fleet[0].url + path, headers={"Accept": "*/*"})
    assert response.code == 200
    manifest = await response.content()
    asked = len(upstream_manifest_gets(proxy))
    assert asked >= 1
    tag_keys = [
        item["Key"]
        for item in botocore_client(swift.endpoint)
        .list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}tags/")
        .get("Contents", [])
    ]
    assert tag_keys, "the tag answer went into the bucket"
    for node in fleet[1:]:
        response = await treq.get(node.url + path, headers={"Accept": "*/*"})
        assert response.code == 200
        assert response.headers.getRawHeaders("X-Cache") == ["HIT"]
        assert await response.content() == manifest
    assert len(upstream_manifest_gets(proxy)) == asked
    assert upstream_gets(proxy, digest) == 1
    await assert_no_keys_anywhere([n.url for n in fleet], [n.process for n in fleet])


@pytest_twisted.ensureDeferred
async def test_a_new_node_with_an_empty_local_tier_serves_everything_from_the_bucket(
    tmp_path, blob, upstream, proxy, swift, prefix, fleet
):
    digest, data = blob
    path = manifest_path(upstream)
    assert await get(fleet[0].blob_url(digest)) == (200, data, True)
    response = await treq.get(fleet[0].url + path, headers={"Accept": "*/*"})
    manifest = await response.content()
    key = object_key(prefix, "blob", digest)
    await until(lambda: in_bucket(swift, key), f"{key} in the bucket")
    await until(
        lambda: (
            botocore_client(swift.endpoint)
            .list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}tags/")
            .get("Contents")
        ),
        "the tag answer in the bucket",
    )
    blob_gets, manifest_gets = upstream_gets(proxy, digest), len(upstream_manifest_gets(proxy))

    # A fourth node joins, a new VM: the same bucket, an empty local tier.
    # (Its peers do not list it, so it is the owner of nothing for them.)
    url = f"http://127.0.0.1:{free_port()}"
    peers = [n.url for n in fleet] + [url]
    new = start_bucket_node(tmp_path / "new", swift, prefix, proxy.url, url, peers)
    try:
        response = await treq.get(f"{url}/v2/library/faults/blobs/{digest}")
        assert response.headers.getRawHeaders("X-Cache") == ["HIT"]
        assert await response.content() == data
        response = await treq.get(url + path, headers={"Accept": "*/*"})
        assert response.headers.getRawHeaders("X-Cache") == ["HIT"]
        assert await response.content() == manifest
        assert upstream_gets(proxy, digest) == blob_gets
        assert len(upstream_manifest_gets(proxy)) == manifest_gets
        text = await metrics(url)
        assert metric(text, "txregistry_bucket_hits_total") >= 2
        # From the bucket, not from a peer.
        peer_fetches = [
            line for line in text.splitlines() if line.startswith("txregistry_peer_fetches_total{")
        ]
        assert peer_fetches and all(line.endswith(" 0.0") for line in peer_fetches)
        await assert_no_keys_anywhere([url], [new])
    finally:
        new.stop()


@pytest_twisted.ensureDeferred
async def test_pulls_go_on_while_the_bucket_is_stopped_and_it_catches_up_after(
    blob, upstream, proxy, swift, prefix, fleet
):
    digest, data = blob
    for node in fleet:
        await until(
            lambda node=node: health(node.url), f"{node.url} answers /health"
        )  # the nodes are up
    swift.stop_proxy()
    try:
        # Every node pulls while the bucket is away: 200s, never a 500.
        gets = [Deferred.fromCoroutine(get(node.blob_url(digest))) for node in fleet]
        results = await DeferredList(gets, fireOnOneErrback=True, consumeErrors=True)
        for _, result in results:
            assert result == (200, data, True)
        # One upstream fetch still: the others asked the owner.
        assert upstream_gets(proxy, digest) == 1, "\n\n".join(
            "\n".join(n.process.lines[-25:]) for n in fleet
        )
        for node in fleet:
            await treq.get(node.url + manifest_path(upstream), headers={"Accept": "*/*"})
            document = await until(
                lambda node=node: _degraded(node.url), f"{node.url} to say its storage is degraded"
            )
            assert "bucket" in document["cache"]["bucket"]["problem"]
        # From each local tier, the bucket still down.
        for node in fleet:
            response = await treq.get(node.blob_url(digest))
            assert response.code == 200
            assert response.headers.getRawHeaders("X-Cache") == ["HIT"]
            assert await response.content() == data
    finally:
        swift.start_proxy()

    # The bucket comes back: the nodes notice (they probe it), and what they
    # fetched meanwhile goes up with its next use.
    for node in fleet:
        await until(lambda node=node: _ok(node.url), f"{node.url} to see the bucket again")
    key = object_key(prefix, "blob", digest)
    for node in fleet:
        assert await get(node.blob_url(digest)) == (200, data, True)
    assert await until(lambda: in_bucket(swift, key), f"{key} in the bucket") == [len(data)]
    assert upstream_gets(proxy, digest) == 1
    await assert_no_keys_anywhere([n.url for n in fleet], [n.process for n in fleet])


async def _degraded(url: str) -> dict | None:
    document = await health(url)
    return document if document["cache"]["status"] == "degraded" else None


async def _ok(url: str) -> bool:
    return bool((await health(url))["cache"]["status"] == "ok")
