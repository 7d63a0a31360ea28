"""
txregistry with C{backend = "s3"} on a real Swift, in front of a real
distribution upstream: what one node fetched, another serves from the
bucket with no upstream contact, and the S3 keys appear nowhere.
"""

from __future__ import annotations

import json
import os

import pytest_twisted
import treq
from harness.registry import hub
from harness.swift import ACCESS_KEY, BUCKET, REGION, SECRET_KEY
from test_s3_storage import settle

from txregistry.config import S3Config, Secret, StorageConfig


def s3_storage(swift) -> StorageConfig:
    return StorageConfig(
        "s3",
        S3Config(
            endpoint=swift.endpoint,
            bucket=BUCKET,
            region=REGION,
            access_key=Secret(ACCESS_KEY),
            secret_key=Secret(SECRET_KEY),
            prefix=f"service-{os.urandom(6).hex()}/",
        ),
    )


@pytest_twisted.ensureDeferred
async def test_a_node_with_an_empty_local_tier_serves_from_the_bucket(
    upstream, blob, swift, start_txregistry, logs
):
    digest, data = blob
    storage = s3_storage(swift)
    first = start_txregistry(hub(upstream.url), storage=storage)
    pushed = upstream.images["small"]
    manifest_path = f"/v2/{pushed.repository}/manifests/{pushed.tag}"
    blob_path = f"/v2/library/faults/blobs/{digest}"

    response = await treq.get(first.url + blob_path)
    assert response.headers.getRawHeaders("X-Cache") == ["MISS"]
    assert await response.content() == data
    response = await treq.get(first.url + manifest_path, headers={"Accept": "*/*"})
    assert response.code == 200
    manifest = await response.content()
    await settle(first.service.storage)

    # A new node: its own, empty local tier, the same bucket.
    since = upstream.registry.mark()
    second = start_txregistry(hub(upstream.url), storage=storage)
    response = await treq.get(second.url + blob_path)
    assert response.headers.getRawHeaders("X-Cache") == ["HIT"]
    assert await response.content() == data
    response = await treq.get(second.url + manifest_path, headers={"Accept": "*/*"})
    assert response.headers.getRawHeaders("X-Cache") == ["HIT"], "the tag answer is shared"
    assert await response.content() == manifest
    upstream.registry.mark()
    contacts = [a for a in upstream.registry.accesses(since) if "marker=" not in a.path]
    assert contacts == [], "the second node never asked the upstream"
    assert second.service.storage.bucket_hits >= 2

    health = json.loads(await (await treq.get(second.url + "/health")).content())
    assert health["cache"]["backend"] == "s3"
    assert health["cache"]["bucket"]["status"] == "ok"
    metrics = (await (await treq.get(second.url + "/metrics")).content()).decode()
    assert "txregistry_bucket_hits_total" in metrics
    everything = logs.text() + json.dumps(health) + metrics
    assert SECRET_KEY not in everything and ACCESS_KEY not in everything


def test_cache_stats_covers_the_local_tier_and_the_bucket(tmp_path, swift):
    import subprocess
    import sys
    from pathlib import Path

    from harness.swift import botocore_client

    from txregistry.storage.disk import DiskStorage
    from txregistry.storage.runner import run_inline

    local = DiskStorage(tmp_path / "cache", 1 << 30, run_inline)
    local.start()
    local.stop()
    prefix = f"stats-{os.urandom(6).hex()}/"
    s3 = botocore_client(swift.endpoint)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}blobs/sha256/{'1' * 64}", Body=b"x" * 1000)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}manifests/sha256/{'2' * 64}", Body=b"y" * 24)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}tags/docker.io%2Fa%3A1", Body=b"{}")
    config = tmp_path / "txregistry.toml"
    config.write_text(
        f'[cache]\ndirectory = "{tmp_path / "cache"}"\n'
        f'[storage]\nbackend = "s3"\n[storage.s3]\nendpoint = "{swift.endpoint}"\n'
        f'bucket = "{BUCKET}"\nprefix = "{prefix}"\nregion = "{REGION}"\n'
    )
    root = Path(__file__).parents[2]
    environment = {
        **os.environ,
        "PYTHONPATH": str(root),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    done = subprocess.run(
        [sys.executable, "-m", "txregistry", "cache", "stats", "--config", str(config)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"bucket      {BUCKET} at {swift.endpoint} under {prefix}" in done.stdout
    assert "1.0 KiB: 1 blobs, 1 manifests, 1 tags" in done.stdout, done.stdout
    assert SECRET_KEY not in done.stdout + done.stderr


@pytest_twisted.ensureDeferred
async def test_pulls_go_on_while_the_bucket_is_stopped_and_it_comes_back(
    upstream, blob, swift, start_txregistry
):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    digest, data = blob
    node = start_txregistry(hub(upstream.url), storage=s3_storage(swift))
    await node.service.storage.probed
    blob_path = f"/v2/library/faults/blobs/{digest}"
    swift.stop_proxy()
    try:
        response = await treq.get(node.url + blob_path)
        assert response.code == 200 and await response.content() == data
        assert response.headers.getRawHeaders("X-Cache") == ["MISS"]
        health = await (await treq.get(node.url + "/health")).json()
        assert health["cache"]["status"] == "degraded"
        assert "bucket" in health["cache"]["bucket"]["problem"]
        # From the local tier, with the bucket still down.
        response = await treq.get(node.url + blob_path)
        assert response.headers.getRawHeaders("X-Cache") == ["HIT"]
        assert await response.content() == data
    finally:
        swift.start_proxy()
    # The bucket is asked again after the probe interval; wait for it (the
    # deadline guards against a hang, it measures nothing).
    manifest = upstream.images["small"]
    path = f"/v2/{manifest.repository}/manifests/{manifest.tag}"
    for _ in range(600):
        await treq.get(node.url + path, headers={"Accept": "*/*"})
        health = await (await treq.get(node.url + "/health")).json()
        if health["cache"]["status"] == "ok":
            break
        await deferLater(reactor, 0.1, lambda: None)
    assert health["cache"]["status"] == "ok", json.dumps(health["cache"]["bucket"])

    # Nothing is lost: the blob fetched while the bucket was down goes up
    # with its next use.
    from harness.swift import botocore_client

    from txregistry.storage.s3 import object_key

    storage = node.service.storage
    response = await treq.get(node.url + blob_path)
    assert await response.content() == data
    key = object_key(storage.prefix, "blob", digest)
    s3 = botocore_client(swift.endpoint)
    for _ in range(600):
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("Contents", [])
        if listed:
            break
        await deferLater(reactor, 0.1, lambda: None)
    assert [item["Size"] for item in listed] == [len(data)]
