"""The service tree and what it says at startup."""

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from txregistry.config import (
    CacheConfig,
    Config,
    Credentials,
    FleetConfig,
    MirrorConfig,
    ProxyConfig,
    ProxyServer,
    RegistryConfig,
    Secret,
    ServerConfig,
    UpstreamConfig,
)
from txregistry.service import Listener, RegistryService


def service_for(tmp_path: Path, *registries: RegistryConfig) -> RegistryService:
    config = Config(
        server=ServerConfig(listen=("tcp:5050", "tcp:5443")),
        cache=CacheConfig(tmp_path / "cache"),
        registries=registries,
    )
    return RegistryService(config, MemoryReactorClock())


def test_one_listener_per_description(tmp_path):
    service = service_for(
        tmp_path, RegistryConfig("docker.io", (MirrorConfig("https://r.example"),))
    )
    listeners = [s for s in service if isinstance(s, Listener)]
    assert [listener.description for listener in listeners] == [
        "tcp:5050",
        "tcp:5443",
        "tcp:5051:interface=127.0.0.1",
    ]
    assert listeners[-1] in service.admin_listeners
    assert all(listener.parent is service for listener in listeners)


def test_startup_says_how_each_registry_is_reached_without_secrets(tmp_path, logs):
    proxy = ProxyServer("proxy.example", 3128, Secret("Basic cHJveHk6c2VjcmV0"))
    registry = RegistryConfig(
        "docker.io",
        (MirrorConfig("https://registry-1.docker.io"), MirrorConfig("https://m.example", False)),
        default=True,
        insecure=True,
        credentials=Credentials("alice", Secret("hunter2"), "/etc/txregistry/password"),
        upstream=UpstreamConfig(proxy=ProxyConfig(https=proxy, no_proxy=("internal.example",))),
    )
    service = service_for(tmp_path, registry)
    service.privilegedStartService()
    text = logs.text()
    assert (
        "registry docker.io (default): mirrors https://registry-1.docker.io,"
        " https://m.example (digest-only); IPv4-only connections"
    ) in text
    assert (
        "using credentials for registry docker.io (user: alice, password from"
        " /etc/txregistry/password)"
    ) in text
    assert "registry docker.io: TLS certificates of its mirrors are NOT verified" in text
    assert (
        "registry docker.io: https upstreams through proxy http://proxy.example:3128,"
        " except internal.example"
    ) in text
    assert "hunter2" not in text and "cHJveHk6c2VjcmV0" not in text
    assert "listening on tcp:5050" in text and "listening on tcp:5443" in text


def test_startup_names_the_mirror_whose_own_credentials_are_used(tmp_path, logs):
    company = Credentials("ci", Secret("c0mpany"), "/etc/txregistry/company.password")
    registry = RegistryConfig(
        "docker.io",
        (
            MirrorConfig("https://artifactory.example", credentials=company),
            MirrorConfig("https://registry-1.docker.io"),
        ),
        default=True,
        credentials=Credentials("alice", Secret("hunter2"), "$HUB_TOKEN"),
    )
    service_for(tmp_path, registry).privilegedStartService()
    text = logs.text()
    assert (
        "using credentials for registry docker.io mirror https://artifactory.example"
        " (user: ci, password from /etc/txregistry/company.password)"
    ) in text
    assert (
        "using credentials for registry docker.io (user: alice, password from $HUB_TOKEN)" in text
    )
    assert "mirror https://registry-1.docker.io (user" not in text
    assert "c0mpany" not in text and "hunter2" not in text


def test_health_reports_a_degraded_cache(tmp_path):
    service = service_for(
        tmp_path, RegistryConfig("docker.io", (MirrorConfig("https://r.example"),))
    )
    service.storage.open()
    code, document = service.health()
    assert (code, document["status"], document["cache"]["status"]) == (200, "ok", "ok")
    service.storage.report_problem("cannot write to the cache: No space left on device")
    code, document = service.health()
    assert (code, document["status"]) == (200, "degraded")
    assert document["cache"] == {
        "backend": "disk",
        "directory": str(tmp_path / "cache"),
        "status": "degraded",
        "problem": "cannot write to the cache: No space left on device",
        "scrub": {
            "state": "waiting",
            "rate": 4 << 20,
            "passes": 0,
            "checked_bytes": 0,
            "corrupt_removed": 0,
        },
        "size": 0,
        "pinned": {"bytes": 0, "entries": 0},
        "uploads_in_progress": 0,
    }
    service.storage.close()


def test_a_fleet_node_shows_its_peers_in_health_and_startup(tmp_path, logs):
    config = Config(
        server=ServerConfig(listen=("tcp:5050",)),
        cache=CacheConfig(tmp_path / "cache"),
        registries=(
            RegistryConfig("docker.io", (MirrorConfig("https://r.example"),), default=True),
        ),
        fleet=FleetConfig("http://10.0.0.5:5050", ("http://10.0.0.6:5050",)),
    )
    service = RegistryService(config, MemoryReactorClock())
    service.privilegedStartService()
    assert "fleet: this node is http://10.0.0.5:5050; peers http://10.0.0.6:5050" in logs.text()
    _, health = service.health()
    assert health["fleet"] == {
        "self": "http://10.0.0.5:5050",
        "peers": [{"url": "http://10.0.0.6:5050", "state": "ok", "consecutive_failures": 0}],
    }
    assert service.upstreams["docker.io"].fleet is service.fleet
    # Without [fleet], /health has no fleet.
    assert "fleet" not in service_for(tmp_path, config.registries[0]).health()[1]


def test_health_counts_pinned_content_apart(tmp_path):
    from txregistry.storage.interface import StorageFigures

    service = service_for(tmp_path, RegistryConfig("local", (), hosted=True))
    service.storage.figures = StorageFigures(
        size=5000, entries=9, pinned_size=3000, pinned_entries=4
    )
    _, document = service.health()
    assert document["cache"]["size"] == 5000
    assert document["cache"]["pinned"] == {"bytes": 3000, "entries": 4}
    # A hosted registry has no upstream to describe.
    assert "local" not in document["registries"]
