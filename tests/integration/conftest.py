"""
Real parts on loopback: distribution registries as upstreams, filled with
images the tests build and push with skopeo, and txregistry in between.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness.faults import FaultProxy
from harness.images import big_image, small_image, write_layout
from harness.network import TinyProxy
from harness.pki import CertificateAuthority, token_signing_credential
from harness.processes import Process
from harness.registry import DistributionRegistry
from harness.skopeo import Skopeo
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from txregistry.config import CacheConfig, Config, RegistryConfig, ServerConfig, StorageConfig
from txregistry.service import RegistryService

HARNESS = Path(__file__).parents[1]


@dataclass(frozen=True)
class Pushed:
    """An image pushed upstream: where, and the digest of its top manifest."""

    repository: str
    tag: str
    digest: str


@dataclass
class Upstream:
    registry: DistributionRegistry
    images: dict[str, Pushed] = field(default_factory=dict)
    token_server: Process | None = None

    @property
    def url(self) -> str:
        return self.registry.url


ALL_IMAGES = ("small", "docker", "multi", "big")


def push_images(
    skopeo: Skopeo,
    layouts: Path,
    registry: DistributionRegistry,
    *creds: str,
    names: tuple[str, ...] = ALL_IMAGES,
    tag: str = "v1",
) -> dict[str, Pushed]:
    """Build the test images and push them; return them by short name."""
    images = {}

    def push(name: str, layout_args: tuple, *options: str) -> None:
        if name not in names:
            return
        layout = layouts / name
        write_layout(layout, "t", *layout_args)
        digest_file = layouts / f"{name}.digest"
        skopeo.run(
            "copy",
            "--dest-tls-verify=false",
            *creds,
            "--digestfile",
            str(digest_file),
            *options,
            f"oci:{layout}:t",
            f"docker://{registry.host}/library/{name}:{tag}",
        )
        images[name] = Pushed(f"library/{name}", tag, digest_file.read_text().strip())

    push("small", ([small_image(1)],))
    push("docker", ([small_image(2)],), "--format", "v2s2")
    amd64, arm64 = small_image(3), small_image(4)
    arm64.architecture = "arm64"
    push("multi", ([amd64, arm64], True), "--all")
    push("big", ([big_image(64 << 20 | 12345)],))
    return images


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory) -> Skopeo:
    return Skopeo(tmp_path_factory.mktemp("skopeo"))


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, skopeo) -> Iterator[Upstream]:
    """A plain-HTTP distribution registry holding the test images."""
    registry = DistributionRegistry(tmp_path_factory.mktemp("upstream")).start()
    try:
        yield Upstream(registry, push_images(skopeo, tmp_path_factory.mktemp("layouts"), registry))
    finally:
        registry.stop()


def start_token_server(directory: Path, *extra: str) -> tuple[Process, str, Path]:
    signer = token_signing_credential(directory)
    process = Process(
        [
            sys.executable,
            "-m",
            "harness.token_server",
            "--cert",
            str(signer.cert),
            "--key",
            str(signer.key),
            "--service",
            "test-registry",
            "--issuer",
            "test-issuer",
            *extra,
        ],
        cwd=HARNESS,
    )
    port = process.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    return process, f"http://127.0.0.1:{port}/token", signer.cert


def token_registry(directory: Path, realm: str, signer: Path) -> DistributionRegistry:
    auth = {
        "token": {
            "realm": realm,
            "service": "test-registry",
            "issuer": "test-issuer",
            "rootcertbundle": str(signer),
        }
    }
    return DistributionRegistry(directory, auth=auth).start()


@pytest.fixture(scope="session")
def token_upstream(tmp_path_factory, skopeo) -> Iterator[Upstream]:
    """A distribution registry with token auth, and its anonymous token service."""
    directory = tmp_path_factory.mktemp("token-upstream")
    token_server, realm, signer = start_token_server(directory)
    registry = token_registry(directory, realm, signer)
    try:
        images = push_images(skopeo, directory / "layouts", registry)
        yield Upstream(registry, images, token_server)
    finally:
        registry.stop()
        token_server.stop()


USER, PASSWORD = "alice", "pw-Tr0ub4dor&3"


@pytest.fixture(scope="session")
def login_token_upstream(tmp_path_factory, skopeo) -> Iterator[Upstream]:
    """A token-auth registry whose token service requires USER and PASSWORD."""
    directory = tmp_path_factory.mktemp("login-token-upstream")
    token_server, realm, signer = start_token_server(directory, "--user", f"{USER}:{PASSWORD}")
    registry = token_registry(directory, realm, signer)
    try:
        creds = ("--dest-creds", f"{USER}:{PASSWORD}")
        images = push_images(skopeo, directory / "layouts", registry, *creds, names=("small",))
        yield Upstream(registry, images, token_server)
    finally:
        registry.stop()
        token_server.stop()


def htpasswd_registry(
    directory: Path, skopeo: Skopeo, user: str, password: str, names: tuple[str, ...]
) -> Upstream:
    """A registry with htpasswd (Basic) auth for one user, holding the images C{names}."""
    directory.mkdir(parents=True, exist_ok=True)
    htpasswd = directory / "htpasswd"
    done = subprocess.run(
        ["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True
    )
    htpasswd.write_text(done.stdout)
    registry = DistributionRegistry(
        directory, auth={"htpasswd": {"realm": "test", "path": str(htpasswd)}}
    ).start()
    try:
        creds = ("--dest-creds", f"{user}:{password}")
        images = push_images(skopeo, directory / "layouts", registry, *creds, names=names)
    except BaseException:
        registry.stop()
        raise
    return Upstream(registry, images)


@pytest.fixture(scope="session")
def htpasswd_upstream(tmp_path_factory, skopeo) -> Iterator[Upstream]:
    """A registry with htpasswd (Basic) auth for USER and PASSWORD."""
    directory = tmp_path_factory.mktemp("htpasswd-upstream")
    upstream = htpasswd_registry(directory, skopeo, USER, PASSWORD, ("small",))
    try:
        yield upstream
    finally:
        upstream.registry.stop()


@pytest.fixture(scope="session")
def ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def tls_upstream(tmp_path_factory, skopeo, ca) -> Iterator[Upstream]:
    """An HTTPS registry with a certificate from the test CA."""
    directory = tmp_path_factory.mktemp("tls-upstream")
    credential = ca.issue("registry")
    registry = DistributionRegistry(directory, tls=(credential.chain, credential.key)).start()
    try:
        yield Upstream(
            registry, push_images(skopeo, directory / "layouts", registry, names=("small",))
        )
    finally:
        registry.stop()


@pytest.fixture
def tinyproxy(tmp_path) -> Iterator[TinyProxy]:
    proxy = TinyProxy(tmp_path / "tinyproxy")
    yield proxy
    proxy.stop()


def password_file(directory: Path, password: str = PASSWORD) -> Path:
    path = directory / "password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Running:
    service: RegistryService

    @property
    def port(self) -> int:
        return self.service.listeners[0].port.getHost().port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"


@pytest.fixture
def start_txregistry(tmp_path) -> Iterator:
    """Start txregistry in this process, in front of the given upstreams."""
    started: list[RegistryService] = []

    def start(
        *registries: RegistryConfig,
        tag_ttl: float = 300.0,
        directory: Path | None = None,
        reactor: Any = reactor,
        resolver: Any = None,
        admin_listen: tuple[str, ...] = (),
        storage: StorageConfig | None = None,
    ) -> Running:
        config = Config(
            server=ServerConfig(listen=("tcp:0:interface=127.0.0.1",), admin_listen=admin_listen),
            cache=CacheConfig(directory or tmp_path / f"cache{len(started)}", 1 << 30, tag_ttl),
            registries=registries,
            storage=storage or StorageConfig(),
        )
        service = RegistryService(config, reactor, resolver)
        service.privilegedStartService()
        service.startService()
        started.append(service)
        return Running(service)

    yield start
    for service in started:
        if service.running:
            pytest_twisted.blockon(service.stopService())


FAULT_BLOB_SIZE = 3 << 20


@pytest.fixture(scope="session")
def blob(upstream) -> tuple[str, bytes]:
    """A 3 MiB blob in the plain upstream, as library/faults."""
    data = os.urandom(FAULT_BLOB_SIZE)
    digest = upstream.registry.upload_blob("library/faults", lambda: iter([data]))
    return digest, data


@pytest.fixture
def proxy(upstream) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the plain upstream."""
    proxy = pytest_twisted.blockon(
        Deferred.fromCoroutine(FaultProxy(upstream.registry.port).start())
    )
    yield proxy
    pytest_twisted.blockon(Deferred.fromCoroutine(proxy.stop()))
