"""
The real clients pull through txregistry: Docker's daemon, podman and
containerd's ctr (L{harness.clients}), by tag and by digest, naming
txregistry directly and through each client's mirror setting, from a
distribution registry upstream.

Each image is pulled twice, with the client's local copy removed in
between: the first pull is answered from the upstream (C{MISS}), the second
entirely from the cache (C{HIT}, and the upstream sees no request for it).
One daemon of each kind serves the whole module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from conftest import Running, Upstream
from harness.clients import Containerd, DockerDaemon, Podman
from harness.images import small_image, write_layout
from harness.registry import hub
from harness.skopeo import Skopeo
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from txregistry.config import CacheConfig, Config, ServerConfig
from txregistry.service import RegistryService

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Answer:
    method: str
    path: str
    status: int
    cache: str


class Served:
    """What txregistry answered, read from its access log events."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") == "txregistry.access":
            self.answers.append(
                Answer(event["method"], event["path"], event["status"], event["cache"])
            )

    def mark(self) -> int:
        return len(self.answers)

    def content(self, since: int, repository: str) -> list[Answer]:
        """The manifest and blob answers for C{repository} since C{since}."""
        return [
            answer
            for answer in self.answers[since:]
            if f"{repository}/manifests/" in answer.path or f"{repository}/blobs/" in answer.path
        ]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    served = Served()
    globalLogPublisher.addObserver(served)
    yield served
    globalLogPublisher.removeObserver(served)


@pytest.fixture(scope="module")
def tx(tmp_path_factory, upstream: Upstream, served: Served) -> Iterator[Running]:
    """One txregistry for the module, caching docker.io from the upstream."""
    config = Config(
        server=ServerConfig(listen=("tcp:0:interface=127.0.0.1",)),
        cache=CacheConfig(tmp_path_factory.mktemp("clients-cache"), 1 << 30, 300.0),
        registries=(hub(upstream.url),),
    )
    service = RegistryService(config, reactor, None)
    service.privilegedStartService()
    service.startService()
    yield Running(service)
    pytest_twisted.blockon(service.stopService())


@pytest.fixture(scope="module")
def docker(tmp_path_factory, tx: Running) -> Iterator[DockerDaemon]:
    daemon = DockerDaemon(
        tmp_path_factory.mktemp("docker"), insecure=[tx.host], mirrors=[tx.url]
    ).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def podman(tmp_path_factory, tx: Running) -> Iterator[Podman]:
    client = Podman(tmp_path_factory.mktemp("podman"))
    client.mirror(f"{tx.host}/docker.io")
    yield client
    client.stop()


@pytest.fixture(scope="module")
def ctr(tmp_path_factory, tx: Running) -> Iterator[Containerd]:
    daemon = Containerd(tmp_path_factory.mktemp("containerd")).start()
    daemon.mirror("docker.io", tx.url)
    yield daemon
    daemon.stop()


CLIENTS = ["docker", "podman", "ctr"]


@pytest.fixture(params=CLIENTS)
def client(request):
    return request.getfixturevalue(request.param)


@dataclass(frozen=True)
class Pushed:
    repository: str
    digest: str
    blobs: frozenset[str]


_seeds = iter(range(1000, 2000))


def push(skopeo: Skopeo, upstream: Upstream, directory: Path, name: str) -> Pushed:
    """A new image (no layer shared with any other) pushed upstream as C{library/NAME:v1}."""
    layout = directory / "layout"
    digest = write_layout(layout, "t", [small_image(next(_seeds))])
    skopeo.run(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{layout}:t",
        f"docker://{upstream.registry.host}/library/{name}:v1",
    )
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
    blobs = {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}
    return Pushed(f"library/{name}", digest, frozenset(blobs))


def upstream_requests(upstream: Upstream, since: int, repository: str) -> list[str]:
    upstream.registry.mark()
    return [
        f"{a.method} {a.path}"
        for a in upstream.registry.accesses(since)
        if f"/{repository}/" in a.path
    ]


def blobs_of(answers: list[Answer]) -> set[str]:
    return {a.path.split("/blobs/")[1].split("?")[0] for a in answers if "/blobs/" in a.path}


async def cold_then_warm(client, served, upstream, pushed, reference):
    """
    Pull C{reference} twice, removing the client's copy in between; check
    that the first came from the upstream and the second from the cache.
    """
    await client.remove_all()
    before = served.mark()
    assert await client.pull(reference) == pushed.digest
    cold = served.content(before, pushed.repository)
    assert {a.status for a in cold} == {200}, cold
    assert blobs_of(cold) == pushed.blobs
    assert {a.cache for a in cold if "/blobs/" in a.path} == {"MISS"}, cold
    assert "MISS" in {a.cache for a in cold if "/manifests/" in a.path}, cold

    await client.remove_all()
    upstream_mark = upstream.registry.mark()
    before = served.mark()
    assert await client.pull(reference) == pushed.digest
    warm = served.content(before, pushed.repository)
    assert blobs_of(warm) == pushed.blobs
    assert {(a.status, a.cache) for a in warm} == {(200, "HIT")}, warm
    assert upstream_requests(upstream, upstream_mark, pushed.repository) == []


@pytest_twisted.ensureDeferred
async def test_pull_by_tag_cold_then_warm(client, request, tx, served, upstream, skopeo, tmp_path):
    name = f"{request.node.callspec.params['client']}-by-tag"
    pushed = push(skopeo, upstream, tmp_path, name)
    await cold_then_warm(client, served, upstream, pushed, f"{tx.host}/{pushed.repository}:v1")


@pytest_twisted.ensureDeferred
async def test_pull_by_digest_cold_then_warm(
    client, request, tx, served, upstream, skopeo, tmp_path
):
    name = f"{request.node.callspec.params['client']}-by-digest"
    pushed = push(skopeo, upstream, tmp_path, name)
    reference = f"{tx.host}/{pushed.repository}@{pushed.digest}"
    await cold_then_warm(client, served, upstream, pushed, reference)


@pytest_twisted.ensureDeferred
async def test_pull_through_the_mirror_setting(client, request, served, upstream, skopeo, tmp_path):
    """
    docker.io names, with txregistry as the mirror: Docker's
    C{registry-mirrors}, a registries.conf mirror (C{/v2/docker.io/...}),
    and containerd's hosts.toml (C{?ns=docker.io}).
    """
    name = f"{request.node.callspec.params['client']}-mirrored"
    pushed = push(skopeo, upstream, tmp_path, name)
    await cold_then_warm(client, served, upstream, pushed, f"docker.io/{pushed.repository}:v1")
