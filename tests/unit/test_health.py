"""
/health and the usable-registry metric when the upstream dies and comes
back, on a Clock: a monitor must see a registry with no usable mirror,
while what is cached keeps being served.
"""

import json
from pathlib import Path

from harness.memory import OCI_MANIFEST, FakeRegistry, MemoryRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock

from txregistry.config import CacheConfig, Config, MirrorConfig, RegistryConfig, ServerConfig
from txregistry.service import RegistryService
from txregistry.upstream.mirrors import Outcome

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
DOCKER_IO = RegistryConfig(
    "docker.io",
    (MirrorConfig("https://a.test"), MirrorConfig("https://c.test", resolve_tags=False)),
    default=True,
)
QUAY = RegistryConfig("quay.io", (MirrorConfig("https://quay.test"),))


def usable(registry: MemoryRegistry) -> dict[str, float]:
    body = registry.get("/metrics").body.decode()
    return {
        sample.labels["registry"]: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "txregistry_registry_usable"
    }


class TestInMemory:
    def test_down_degraded_then_recovered(self, tmp_path):
        a = FakeRegistry()
        tx = MemoryRegistry(
            tmp_path, registries=[DOCKER_IO], hosts={"a.test": a, "c.test": FakeRegistry()}
        )
        upstream = tx.upstreams["docker.io"]
        a.add_manifest("library/x", "1", MANIFEST)
        assert tx.get("/v2/x/manifests/1").status == 200
        assert (upstream.status(), usable(tx)) == ("ok", {"docker.io": 1.0})

        tx.agent.refused.add("a.test")
        tx.clock.advance(600)
        # One failure is a blip: the mirror is not written off yet.
        assert tx.get("/v2/x/manifests/2").status == 502
        assert upstream.status() == "ok"
        assert tx.get("/v2/x/manifests/3").status == 502
        described = upstream.describe()
        assert (described["status"], described["mirrors"][0]["state"]) == (
            "unavailable",
            "backoff",
        )
        assert "no usable mirror" in described["reason"]
        assert usable(tx) == {"docker.io": 0.0}
        # What is cached is still served, if stale.
        cached = tx.get("/v2/x/manifests/1")
        assert (cached.status, cached.headers["x-cache"]) == (200, "STALE")

        # The backoff running out shows nothing about the mirror: still down.
        tx.clock.advance(3600)
        assert upstream.describe()["mirrors"][0]["state"] == "failing"
        assert upstream.status() == "unavailable"

        tx.agent.refused.clear()
        a.add_manifest("library/x", "4", MANIFEST)
        assert tx.get("/v2/x/manifests/4").status == 200
        assert (upstream.status(), usable(tx)) == ("ok", {"docker.io": 1.0})
        assert "reason" not in upstream.describe()

    def test_a_working_digest_only_mirror_does_not_make_tags_pullable(self, tmp_path):
        tx = MemoryRegistry(
            tmp_path,
            registries=[DOCKER_IO],
            hosts={"a.test": FakeRegistry(), "c.test": FakeRegistry()},
        )
        tx.agent.refused.add("a.test")
        for tag in ("1", "2"):
            tx.get(f"/v2/x/manifests/{tag}")
        states = [m["state"] for m in tx.upstreams["docker.io"].describe()["mirrors"]]
        assert states == ["backoff", "ok"]
        assert tx.upstreams["docker.io"].status() == "unavailable"


def service_for(tmp_path: Path) -> tuple[RegistryService, MemoryReactorClock]:
    clock = MemoryReactorClock()
    config = Config(
        server=ServerConfig(listen=("tcp:5050",)),
        cache=CacheConfig(tmp_path / "cache"),
        registries=(DOCKER_IO, QUAY),
    )
    return RegistryService(config, clock), clock


def fail(service: RegistryService, registry: str, index: int = 0) -> None:
    mirrors = service.upstreams[registry].mirrors
    state = mirrors.states[index]
    mirrors.record(state, Outcome(state.mirror.url, "connection refused"))


class TestService:
    def test_health_names_each_registry_without_a_usable_mirror(self, tmp_path):
        service, clock = service_for(tmp_path)
        service.storage.open()
        try:
            code, document = service.health()
            assert (code, document["status"]) == (200, "ok")
            assert "unavailable_registries" not in document
            for _ in range(2):
                fail(service, "quay.io")
            code, document = service.health()
            # 200 still: /v2/ and cached pulls work, and a restart would not help.
            assert (code, document["status"]) == (200, "degraded")
            assert document["unavailable_registries"] == ["quay.io"]
            assert document["registries"]["quay.io"]["status"] == "unavailable"
            assert document["registries"]["docker.io"]["status"] == "ok"
            assert document["cache"]["status"] == "ok"

            clock.advance(10_000)
            assert service.health()[1]["status"] == "degraded"
            mirrors = service.upstreams["quay.io"].mirrors
            mirrors.record(mirrors.states[0], None)
            code, document = service.health()
            assert (code, document["status"]) == (200, "ok")
            assert document["registries"]["quay.io"]["status"] == "ok"
        finally:
            service.storage.close()

    def test_an_offline_registry_is_a_choice_not_a_fault(self, tmp_path):
        service, _ = service_for(tmp_path)
        service.storage.open()
        try:
            service.upstreams["quay.io"].offline = True
            document = service.health()[1]
            assert document["status"] == "ok"
            assert document["registries"]["quay.io"]["status"] == "offline"
        finally:
            service.storage.close()
