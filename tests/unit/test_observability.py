"""Metrics, the access log, and stopping gracefully, in memory."""

import json
import os

from harness.memory import OCI_MANIFEST, MemoryRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import NOT_DONE_YET

from txregistry.config import (
    CacheConfig,
    Config,
    Credentials,
    MirrorConfig,
    RegistryConfig,
    Secret,
    ServerConfig,
)
from txregistry.http.exchange import Finished
from txregistry.oci.reference import Digest
from txregistry.service import RegistryService

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
BLOB = os.urandom(100_000)


def samples(registry):
    response = registry.get("/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found, response.body.decode()


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))))


def test_metrics_count_requests_bytes_and_upstream_traffic(tmp_path):
    registry = MemoryRegistry(tmp_path)
    digest = registry.upstream.add_blob(BLOB)
    registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
    registry.get(f"/v2/alpine/blobs/{digest}")
    registry.get(f"/v2/alpine/blobs/{digest}")
    registry.get("/v2/alpine/manifests/1")
    registry.get("/v2/alpine/manifests/missing")
    found, _ = samples(registry)
    requests = "txregistry_requests_total"
    assert value(found, requests, kind="blob", status="200", cache="miss") == 1
    assert value(found, requests, kind="blob", status="200", cache="hit") == 1
    assert value(found, requests, kind="manifest", status="200", cache="miss") == 1
    assert value(found, requests, kind="manifest", status="404", cache="none") == 1
    assert value(found, "txregistry_cache_served_bytes_total") == len(BLOB)
    assert value(found, "txregistry_upstream_fetched_bytes_total") == len(BLOB) + len(MANIFEST)
    mirror = {"registry": "docker.io", "mirror": "https://registry-1.docker.io"}
    assert value(found, "txregistry_upstream_requests_total", **mirror) == 3
    assert value(found, "txregistry_upstream_failures_total", **mirror) == 0
    assert value(found, "txregistry_fills_in_flight") == 0


def test_metrics_count_failures_joins_fills_and_the_rate_limit(tmp_path):
    registry = MemoryRegistry(tmp_path)
    digest = registry.upstream.add_blob(BLOB)
    held = registry.upstream.hold_blob(digest)
    for _ in range(3):
        registry.client().send("GET", f"/v2/alpine/blobs/{digest}")
    found, _ = samples(registry)
    assert value(found, "txregistry_fills_in_flight") == 1
    assert value(found, "txregistry_single_flight_joins_total") == 2
    held[0].write(BLOB)
    held[0].finish()
    registry.pump()

    def limited(request):
        request.setHeader(b"ratelimit-remaining", b"76;w=21600")
        return None

    registry.upstream.hooks.insert(0, limited)
    registry.get("/v2/alpine/manifests/nope")
    registry.agent.refused.add("registry-1.docker.io")
    registry.get("/v2/alpine/manifests/other")
    found, _ = samples(registry)
    assert value(found, "txregistry_dockerhub_ratelimit_remaining", registry="docker.io") == 76
    mirror = {"registry": "docker.io", "mirror": "https://registry-1.docker.io"}
    assert value(found, "txregistry_upstream_failures_total", **mirror) == 1


def test_the_hit_ratio_counts_only_manifests_and_blobs_answered_with_content(tmp_path):
    registry = MemoryRegistry(tmp_path)
    digest = registry.upstream.add_blob(BLOB)
    registry.upstream.add_manifest("library/alpine", "1", MANIFEST)
    assert registry.get(f"/v2/alpine/blobs/{digest}").headers["x-cache"] == "MISS"
    assert registry.get(f"/v2/alpine/blobs/{digest}").headers["x-cache"] == "HIT"
    assert registry.head(f"/v2/alpine/blobs/{digest}").headers["x-cache"] == "HIT"
    assert registry.get("/v2/alpine/manifests/1").headers["x-cache"] == "MISS"
    # Neither hits nor misses: nothing was served, from the cache or not.
    assert registry.get("/v2/alpine/manifests/missing").status == 404
    assert registry.get("/v2/alpine/blobs/sha256:" + "0" * 64).status == 404
    assert registry.get("/v2/alpine/tags/list").status == 200
    registry.agent.refused.add("registry-1.docker.io")
    assert registry.get("/v2/alpine/manifests/other").status == 502
    registry.storage.update_figures()
    assert (registry.storage.figures.hits, registry.storage.figures.misses) == (2, 2)
    found, _ = samples(registry)
    assert value(found, "txregistry_cache_hit_ratio") == 0.5


def test_metrics_count_evictions_and_show_the_cache_size(tmp_path):
    registry = MemoryRegistry(tmp_path, size_limit=150_000)
    first = registry.upstream.add_blob(BLOB)
    second = registry.upstream.add_blob(os.urandom(100_000))
    registry.get(f"/v2/x/blobs/{first}")
    registry.get(f"/v2/x/blobs/{second}")
    registry.storage.update_figures()
    found, _ = samples(registry)
    assert value(found, "txregistry_cache_evictions_total") == 1
    assert value(found, "txregistry_cache_entries") == 1
    assert value(found, "txregistry_cache_size_bytes") == 100_000


def test_metrics_hold_no_secrets(tmp_path):
    secret = "hunter2-the-password"
    hub = RegistryConfig(
        "docker.io",
        (MirrorConfig("https://registry-1.docker.io"),),
        default=True,
        credentials=Credentials("alice", Secret(secret), "/etc/password"),
    )
    registry = MemoryRegistry(tmp_path, registries=[hub])
    registry.get("/v2/alpine/manifests/1")
    _, text = samples(registry)
    assert secret not in text and "alice" not in text


def test_every_request_is_recorded_with_kind_status_cache_bytes_and_time(tmp_path):
    registry = MemoryRegistry(tmp_path)
    digest = registry.upstream.add_blob(BLOB)
    held = registry.upstream.hold_blob(digest)
    registry.client().send("GET", f"/v2/alpine/blobs/{digest}")
    registry.clock.advance(1.5)
    held[0].write(BLOB)
    held[0].finish()
    registry.pump()
    registry.get("/v2/")
    bad = registry.get("/v2/Bad/manifests/1")
    assert [(f.kind, f.status, f.cache, f.sent) for f in registry.finished] == [
        ("blob", 200, "MISS", len(BLOB)),
        ("base", 200, "", 2),
        ("other", 400, "", len(bad.body)),
    ]
    first = registry.finished[0]
    assert (first.duration, first.path, first.method, first.aborted) == (
        1.5,
        f"/v2/alpine/blobs/{digest}",
        "GET",
        False,
    )

    registry.upstream.hooks.insert(0, lambda request: NOT_DONE_YET)  # never answers
    gone = registry.client()
    gone.send("GET", "/v2/alpine/manifests/waiting")
    gone.disconnect()
    last = registry.finished[-1]
    assert (last.path, last.aborted) == ("/v2/alpine/manifests/waiting", True)


def test_access_log_line(tmp_path, logs):
    config = Config(
        cache=CacheConfig(tmp_path), registries=(), server=ServerConfig(admin_listen=())
    )
    service = RegistryService(config, MemoryReactorClock())
    service._finished(
        Finished(
            "127.0.0.1",
            "GET",
            "/v2/library/alpine/manifests/3.20",
            "manifest",
            200,
            "HIT",
            1234,
            0.0123,
            False,
        )
    )
    service._finished(
        Finished("127.0.0.1", "GET", "/v2/x/blobs/sha256:ab", "blob", 200, "MISS", 10, 2.5, True)
    )
    assert logs.matching('127.0.0.1 "GET /v2/library/alpine/manifests/3.20" 200 HIT 1234B 0.012s')
    assert logs.events[-1]["log_namespace"] == "txregistry.access"
    assert logs.matching('127.0.0.1 "GET /v2/x/blobs/sha256:ab" 200 MISS 10B 2.500s aborted')


def drain(registry, timeout=30):
    result = []
    Deferred.fromCoroutine(registry.cache.drain(timeout)).addBoth(result.append)
    return result


def test_stopping_waits_for_downloads_in_progress(tmp_path):
    registry = MemoryRegistry(tmp_path)
    digest, held, client = registry.pull_held(BLOB)
    drained = drain(registry)
    registry.clock.advance(10)
    assert drained == []
    held[0].write(BLOB)
    held[0].finish()
    registry.pump()
    assert drained == [None]
    assert client.response().body == BLOB
    assert registry.storage.open_blob(Digest.parse(digest)).result is not None


def test_stopping_drops_downloads_that_do_not_finish_in_time(tmp_path):
    registry = MemoryRegistry(tmp_path)
    digest, held, client = registry.pull_held(BLOB)
    held[0].write(BLOB[:50_000])
    registry.pump()
    drained = drain(registry, timeout=30)
    registry.clock.advance(30)
    registry.pump()
    assert drained == [None]
    assert client.response().aborted
    assert registry.storage.open_blob(Digest.parse(digest)).result is None
    assert list(registry.storage.tmp_directory.iterdir()) == []


def test_stopping_without_downloads_is_immediate(tmp_path):
    assert drain(MemoryRegistry(tmp_path)) == [None]
