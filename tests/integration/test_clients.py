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
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from conftest import Running, Upstream
from harness.clients import ClientFailed, Containerd, DockerDaemon, Podman
from harness.images import small_image, write_layout
from harness.registry import hub
from harness.skopeo import Skopeo
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from txregistry.config import (
    CacheConfig,
    Config,
    PushUsers,
    RegistryConfig,
    Secret,
    ServerConfig,
)
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
        server=ServerConfig(listen=("tcp:0:interface=127.0.0.1",), admin_listen=()),
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
_names: set[str] = set()


def push(skopeo: Skopeo, upstream: Upstream, directory: Path, name: str) -> Pushed:
    """
    A new image (no layer shared with any other) pushed upstream as
    C{library/NAME:v1}.  A name is used once: txregistry keeps tags for
    C{tag_ttl}, so a second image under it would be served the first's.
    """
    assert name not in _names, f"library/{name} was pushed already"
    _names.add(name)
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


# Pushes (issue 12): to a hosted registry, then pulled back, and with
# push_users_file, with the credentials each client is given, while
# anonymous pulls keep working.  What each client does with txregistry's
# /v2/ challenge is written up in the README's Pushing section.

USER, PASSWORD = "ci", "s3cret-Pw"
# How each client says it was refused: Docker and ctr, podman at login.
REFUSED = r"(?i)unauthorized|401|invalid username/password"


def start_hosted(directory: Path, upstream: Upstream, push_users: PushUsers | None) -> Running:
    config = Config(
        server=ServerConfig(
            listen=("tcp:0:interface=127.0.0.1",), admin_listen=(), push_users=push_users
        ),
        cache=CacheConfig(directory, 1 << 30, 300.0),
        registries=(hub(upstream.url), RegistryConfig("local", (), hosted=True)),
    )
    service = RegistryService(config, reactor, None)
    service.privilegedStartService()
    service.startService()
    return Running(service)


@pytest.fixture(scope="module")
def hosted(tmp_path_factory, upstream: Upstream, served: Served) -> Iterator[Running]:
    """A txregistry with a hosted registry C{local} that anyone on loopback may push to."""
    running = start_hosted(tmp_path_factory.mktemp("hosted-cache"), upstream, None)
    yield running
    pytest_twisted.blockon(running.service.stopService())


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, upstream: Upstream, served: Served) -> Iterator[Running]:
    """The same, with C{push_users_file}: pushes need USER's credentials."""
    directory = tmp_path_factory.mktemp("guarded")
    users = directory / "push.htpasswd"
    done = subprocess.run(
        ["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
    )
    users.write_text(done.stdout)
    user, hashed = done.stdout.strip().split(":", 1)
    running = start_hosted(
        directory / "cache", upstream, PushUsers(users, ((user, Secret(hashed)),))
    )
    yield running
    pytest_twisted.blockon(running.service.stopService())


async def local_image(client, tx, served, upstream, skopeo, directory, name) -> str:
    """Pull a new image through C{tx}, so that the client has one to push; its reference."""
    await client.remove_all()
    pushed = push(skopeo, upstream, directory, name)
    reference = f"{tx.host}/{pushed.repository}:v1"
    assert await client.pull(reference) == pushed.digest
    return reference


async def push_from(client, source: str, destination: str, *options: str) -> str:
    """Push the local image C{source} as C{destination}; the manifest digest pushed."""
    if isinstance(client, Podman):
        return await client.push(source, destination)
    await client.tag(source, destination)
    return await client.push(destination, *options)


def manifest_puts(served: Served, since: int, repository: str) -> list[Answer]:
    return [
        a
        for a in served.answers[since:]
        if a.method == "PUT" and f"/{repository}/manifests/" in a.path
    ]


async def pull_back(client, served, repository: str, reference: str, digest: str) -> None:
    """Pull C{reference} with no local copy; it must be the pushed C{digest}, from txregistry."""
    await client.remove_all()
    before = served.mark()
    assert await client.pull(reference) == digest
    answers = served.content(before, repository)
    assert answers and {a.status for a in answers} == {200}, answers


@pytest_twisted.ensureDeferred
async def test_push_to_a_hosted_registry_and_pull_back(
    client, request, tx, hosted, served, upstream, skopeo, tmp_path
):
    name = request.node.callspec.params["client"]
    source = await local_image(client, tx, served, upstream, skopeo, tmp_path, f"{name}-source")
    repository = f"local/{name}-app"
    destination = f"{hosted.host}/{repository}:1"
    before = served.mark()
    upstream_mark = upstream.registry.mark()
    digest = await push_from(client, source, destination)
    (put,) = manifest_puts(served, before, repository)
    assert (put.path, put.status) == (f"/v2/{repository}/manifests/1", 201)
    await pull_back(client, served, repository, destination, digest)
    await pull_back(client, served, repository, f"{hosted.host}/{repository}@{digest}", digest)
    # Hosted content is never asked of an upstream.
    assert upstream_requests(upstream, upstream_mark, repository) == []


@pytest_twisted.ensureDeferred
async def test_push_with_credentials_while_pulls_stay_anonymous(
    client, request, tx, guarded, served, upstream, skopeo, tmp_path
):
    """
    With C{push_users_file}: Docker and podman log in, ctr is given
    C{--user}; without credentials the push is refused, and pulls (from
    the pull-through registry and from the hosted one) need none.
    """
    name = request.node.callspec.params["client"]
    # An anonymous pull through the guarded txregistry's pull-through registry.
    pushed = push(skopeo, upstream, tmp_path / "upstream", f"{name}-guarded")
    await client.remove_all()
    assert await client.pull(f"{guarded.host}/{pushed.repository}:v1") == pushed.digest

    source = f"{guarded.host}/{pushed.repository}:v1"
    repository = f"local/{name}-private"
    destination = f"{guarded.host}/{repository}:1"
    if isinstance(client, Containerd):
        # The blobs are in the cache already, so ctr uploads none: its
        # first write is the manifest PUT, with its body, answered 401
        # and sent again once ctr has a token.  Without credentials each
        # 401 restarts ctr's copy of the manifest, and it gives up after
        # five resets (containerd's content.Copy limit).
        before = served.mark()
        with pytest.raises(ClientFailed, match="failed to copy after 5 retries"):
            await push_from(client, source, destination)
        refused = manifest_puts(served, before, repository)
        assert refused and {put.status for put in refused} == {401}, refused
        before = served.mark()
        digest = await push_from(client, source, destination, "--user", f"{USER}:{PASSWORD}")
        puts = manifest_puts(served, before, repository)
        assert [put.status for put in puts] == [401, 201], puts
        uploads = [a for a in served.answers[before:] if a.method == "POST" and "/blobs/" in a.path]
        assert uploads == []
    else:
        with pytest.raises(ClientFailed, match=REFUSED):
            await push_from(client, source, destination)
        # Refused: nothing was stored under the tag.
        assert [a for a in manifest_puts(served, 0, repository) if a.status < 400] == []
        with pytest.raises(ClientFailed, match=REFUSED):
            await client.login(guarded.host, USER, "not-the-password")  # checked at login
        await client.login(guarded.host, USER, PASSWORD)
        digest = await push_from(client, source, destination)
        await client.logout(guarded.host)
    assert [a.status for a in manifest_puts(served, 0, repository)][-1] == 201

    # Anonymous again: the pushed image pulls back by tag and by digest.
    await pull_back(client, served, repository, destination, digest)
    await pull_back(client, served, repository, f"{guarded.host}/{repository}@{digest}", digest)
