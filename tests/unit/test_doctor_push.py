"""doctor --push's pure parts: which registry and repository, and the generated blob."""

import hashlib

import pytest

from txregistry.cli.doctor_push import GeneratedBlob, find_registry
from txregistry.config import CacheConfig, Config, Credentials, MirrorConfig, RegistryConfig, Secret


def config(*registries: RegistryConfig) -> Config:
    return Config(cache=CacheConfig("/nonexistent"), registries=registries)


def test_the_registry_and_repository_named():
    origin = RegistryConfig("registry.example.com", (MirrorConfig("https://r.example"),), push=True)
    registry, repository = find_registry(config(origin), "registry.example.com/team/app")
    assert registry is origin and repository == "team/app"
    assert (
        find_registry(config(origin), "registry.example.com")[1] == "txregistry/txregistry-doctor"
    )


def test_docker_hub_defaults_to_a_repository_of_the_users_own():
    hub = RegistryConfig(
        "docker.io",
        (MirrorConfig("https://registry-1.docker.io"),),
        credentials=Credentials("alice", Secret("pw"), "test"),
    )
    assert find_registry(config(hub), "docker.io")[1] == "alice/txregistry-doctor"


def test_an_unknown_registry_or_one_with_no_origin_is_refused():
    digest_only = RegistryConfig("x.io", (MirrorConfig("https://x.io", resolve_tags=False),))
    with pytest.raises(
        ValueError, match=r"registry 'y\.io' is not configured \(configured: x\.io\)"
    ):
        find_registry(config(digest_only), "y.io/app")
    with pytest.raises(ValueError, match="no mirror that resolves tags"):
        find_registry(config(digest_only), "x.io/app")


def test_the_generated_blob_reads_back_as_its_digest_in_any_pieces():
    blob = GeneratedBlob((3 << 20) + 12345, seed=b"0123456789abcdef")
    pieces = []
    offset = 0
    lengths = [1000, (1 << 20) - 1000 + 7, 5, 2 << 20, 300 << 10]
    while offset < blob.size:
        piece = blob.read(offset, lengths[len(pieces) % len(lengths)])
        pieces.append(piece)
        offset += len(piece)
    assert offset == blob.size
    assert f"sha256:{hashlib.sha256(b''.join(pieces)).hexdigest()}" == str(blob.digest)
    # Blocks differ from each other: no two 1 MiB blocks alike.
    assert blob.read(0, 1 << 20) != blob.read(1 << 20, 1 << 20)
