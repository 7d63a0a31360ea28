"""
The push-through repository, in memory: what a client pushed goes to the
origin before the client is answered, and stays in the cache for pulls.
"""

from __future__ import annotations

import json

from harness.memory import OCI_MANIFEST
from harness.origin import FakeOrigin, OriginNetwork
from test_push_origin import blob, registry, run

from txregistry.oci.reference import Digest, Tag
from txregistry.repository.interface import Kind, Route
from txregistry.repository.push import PushedManifest, VerifiedBlob
from txregistry.repository.push_through import PushThroughRepository
from txregistry.repository.tags import tag_key
from txregistry.storage.disk import DiskStorage
from txregistry.storage.runner import run_inline
from txregistry.storage.staging import InlineSpool
from txregistry.upstream.push import OriginPusher, PushFailed


def setup(tmp_path, origin: FakeOrigin, chunk: int = 64 << 10):
    net = OriginNetwork(origin)
    config = registry(chunk=chunk)
    storage = DiskStorage(
        tmp_path / "cache", 1 << 30, run_inline, spools=InlineSpool, now=net.clock.seconds
    )
    storage.start()
    target = PushThroughRepository(storage, OriginPusher(config, net.agent, net.clock), net.clock)
    return net, config, storage, target


def staged(storage, data: bytes, digest: Digest):
    staged = storage.stage_blob(digest)
    staged.append(data)
    assert run_result(staged.seal()) == digest.hex
    return VerifiedBlob(digest, len(data), staged)


def run_result(deferred):
    results = []
    deferred.addBoth(results.append)
    return results[0]


def test_a_pushed_blob_goes_to_the_origin_and_stays_in_the_cache(tmp_path):
    origin = FakeOrigin()
    net, config, storage, target = setup(tmp_path, origin)
    data, digest = blob(200 << 10)
    route = Route(config, "team/app", Kind.BLOB, digest)

    assert run(net, target.receive_blob(route, staged(storage, data, digest))) is None

    assert origin.blobs[str(digest)] == data
    assert len(origin.requests("PATCH")) == 4
    stored = run_result(storage.open_blob(digest))
    assert stored is not None and stored.source.read(0, 10) == data[:10]
    stored.source.release()
    assert run(net, target.blob_size(route, digest)) == len(data)


def test_a_blob_the_origin_refuses_is_the_clients_error_and_not_cached(tmp_path):
    origin = FakeOrigin(body_limit=32 << 10)
    net, config, storage, target = setup(tmp_path, origin)
    data, digest = blob(100 << 10)
    route = Route(config, "team/app", Kind.BLOB, digest)
    verified = staged(storage, data, digest)

    error = run(net, target.receive_blob(route, verified))
    verified.staged.abort()

    assert isinstance(error, PushFailed) and "HTTP 413" in error.message
    assert run_result(storage.open_blob(digest)) is None


def test_a_pushed_tag_is_a_hit_for_the_next_pull(tmp_path):
    origin = FakeOrigin()
    net, config, storage, target = setup(tmp_path, origin)
    data, digest = blob(100)
    run(
        net,
        target.receive_blob(
            Route(config, "team/app", Kind.BLOB, digest), staged(storage, data, digest)
        ),
    )
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": str(digest), "size": 100, "mediaType": "x"},
            "layers": [],
        }
    ).encode()
    manifest_digest = Digest.of(body)
    route = Route(config, "team/app", Kind.MANIFEST, Tag("1.0"))
    pushed = PushedManifest(manifest_digest, OCI_MANIFEST, body, "1.0", (digest,))

    assert run(net, target.receive_manifest(route, pushed)) is None

    assert origin.manifests["1.0"] == body
    entry = run_result(storage.get_tag(tag_key(route, Tag("1.0"))))
    assert entry.digest == str(manifest_digest) and entry.checked_at == net.clock.seconds()
    assert run_result(storage.get_manifest(manifest_digest)).body == body


def test_a_blob_only_the_cache_has_is_pushed_from_it_when_a_manifest_names_it(tmp_path):
    # The client's HEAD was answered from the cache, so it never uploaded
    # the blob; the manifest check finds the origin without it.
    origin = FakeOrigin()
    net, config, storage, target = setup(tmp_path, origin)
    data, digest = blob(100 << 10)
    verified = staged(storage, data, digest)
    assert run_result(verified.staged.commit(digest, len(data))) is True
    verified.staged.close()
    route = Route(config, "team/app", Kind.BLOB, digest)

    assert run(net, target.blob_size(route, digest)) == len(data)

    assert origin.blobs[str(digest)] == data
    assert len(origin.requests("PATCH")) == 2


def test_a_blob_nobody_has_is_unknown(tmp_path):
    origin = FakeOrigin()
    net, config, _, target = setup(tmp_path, origin)
    _, digest = blob(100)

    assert run(net, target.blob_size(Route(config, "team/app", Kind.BLOB, digest), digest)) is None
    assert origin.requests("POST") == []


# Through txregistry's own HTTP layer, as a client pushes.


def pushing_client(tmp_path, origin: FakeOrigin, chunk: int = 64 << 10):
    from harness.memory import MemoryRegistry

    tx = MemoryRegistry(tmp_path, registries=[registry(chunk=chunk)], hosts={"origin.test": origin})
    return tx, tx.client()


def push_blob_through(client, data: bytes, digest: Digest):
    started = client.request("POST", "/v2/origin.test/team/app/blobs/uploads/")
    assert started.status == 202, started.body
    location = started.headers["location"]
    separator = "&" if "?" in location else "?"
    return client.request("PUT", f"{location}{separator}digest={digest}", data)


def test_a_client_push_goes_to_the_origin_before_its_201_and_pulls_back_as_hits(tmp_path):
    origin = FakeOrigin()
    tx, client = pushing_client(tmp_path, origin)
    data, digest = blob(150 << 10)

    done = push_blob_through(client, data, digest)

    assert done.status == 201 and done.headers["docker-content-digest"] == str(digest)
    assert origin.blobs[str(digest)] == data
    assert len(origin.requests("PATCH")) == 3

    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": str(digest), "size": len(data), "mediaType": "x"},
            "layers": [],
        }
    ).encode()
    put = client.request(
        "PUT", "/v2/origin.test/team/app/manifests/1", body, {"Content-Type": OCI_MANIFEST}
    )
    assert put.status == 201, put.body
    assert origin.manifests["1"] == body

    seen = len(origin.seen)
    pulled = tx.get("/v2/origin.test/team/app/manifests/1", {"Accept": OCI_MANIFEST})
    assert pulled.status == 200 and pulled.body == body
    assert pulled.headers["x-cache"] == "HIT"
    layer = tx.get(f"/v2/origin.test/team/app/blobs/{digest}")
    assert layer.status == 200 and layer.body == data and layer.headers["x-cache"] == "HIT"
    assert len(origin.seen) == seen


def test_a_push_the_origin_refuses_is_the_clients_error_with_the_diagnosis(tmp_path):
    origin = FakeOrigin(body_limit=32 << 10)
    tx, client = pushing_client(tmp_path, origin)
    data, digest = blob(100 << 10)

    done = push_blob_through(client, data, digest)

    assert done.status == 400
    error = done.json()["errors"][0]
    assert error["code"] == "BLOB_UPLOAD_INVALID"
    assert "failed at PATCH of the chunk at offset 0 (64KiB): HTTP 413" in error["message"]
    assert "lower push_chunk_size (now 64KiB)" in error["message"]
    assert error["detail"]["step"].startswith("PATCH") and error["detail"]["status"] == 413
    # Nothing of it is kept: the next pull asks the upstream.
    assert run_result(tx.storage.open_blob(digest)) is None
