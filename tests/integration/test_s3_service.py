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
