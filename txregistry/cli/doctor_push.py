"""
C{txregistry doctor --push REGISTRY[/REPOSITORY]}: a test push to the
registry's origin, end to end, the way txregistry pushes through.

It pushes a small blob, a blob larger than C{push_chunk_size} (so at
least two chunks), and a manifest naming both, reporting each step and
each request; then it deletes what it pushed where the origin allows it.
It exits non-zero naming the step that failed and the likely cause: it is
what the person whose registry answered "unknown blob" to every push from
behind a CDN needed (issue 12).

The large blob is generated as it is sent, from a 1 MiB random block, and
never held in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import IO, Any

from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from txregistry.config import Config, RegistryConfig
from txregistry.oci.errors import RegistryError
from txregistry.oci.reference import Digest
from txregistry.upstream.dns import ExplainingResolver
from txregistry.upstream.endpoints import registry_agent
from txregistry.upstream.push import OriginPusher
from txregistry.upstream.push.diagnosis import format_size

_BLOCK = 1 << 20
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TAG = "txregistry-doctor"


class GeneratedBlob:
    """
    C{size} bytes made of 1 MiB blocks, each a random block with its own
    number in front, so that no two blocks (and no two runs) are alike.
    Memory: one block.
    """

    def __init__(self, size: int, seed: bytes | None = None) -> None:
        self.size = size
        self._base = bytearray((seed or os.urandom(16)) + os.urandom(_BLOCK - 16))
        self.digest = self._hash()

    def _block(self, number: int) -> bytes:
        block = self._base[:]
        block[16:24] = number.to_bytes(8, "big")
        return bytes(block)

    def read(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        pieces = []
        while length > 0:
            number, within = divmod(offset, _BLOCK)
            piece = self._block(number)[within : within + length]
            pieces.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b"".join(pieces)

    def _hash(self) -> Digest:
        hasher = hashlib.sha256()
        for offset in range(0, self.size, _BLOCK):
            hasher.update(self.read(offset, _BLOCK))
        return Digest("sha256", hasher.hexdigest())


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.digest = Digest.of(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def find_registry(config: Config, target: str) -> tuple[RegistryConfig, str]:
    """
    The registry and repository that C{REGISTRY[/REPOSITORY]} names; the
    repository defaults to one of the user's own on Docker Hub.

    @raise ValueError: no such registry, or one with nowhere to push.
    """
    name, _, repository = target.partition("/")
    registry = next((r for r in config.registries if name.lower() in r.names), None)
    if registry is None:
        known = ", ".join(r.name for r in config.registries)
        raise ValueError(f"registry {name!r} is not configured (configured: {known})")
    if not any(m.resolve_tags for m in registry.mirrors):
        raise ValueError(f"registry {registry.name} has no mirror that resolves tags to push to")
    if not repository:
        user = registry.credentials.username if registry.credentials else None
        repository = f"{user}/{TAG}" if user and registry.is_docker_hub else f"txregistry/{TAG}"
    return registry, repository


async def doctor_push(
    reactor: Any,
    config: Config,
    target: str,
    out: IO[str],
    resolver: IHostnameResolver | None = None,
) -> int:
    """Run the test push; print each step; return the exit code."""
    try:
        registry, repository = find_registry(config, target)
    except ValueError as e:
        print(f"txregistry doctor --push: {e}", file=out)
        return 2
    resolver = resolver or ExplainingResolver.for_reactor(reactor)
    pusher = OriginPusher(registry, registry_agent(reactor, resolver, registry), reactor)
    chunk = registry.push_chunk_size
    print(
        f"txregistry doctor --push: {registry.name}/{repository} at {pusher.origin.url},"
        f" chunks of at most {format_size(chunk)}",
        file=out,
    )
    if not registry.push:
        print(f"  note: push is not enabled for {registry.name}: set push = true", file=out)

    @provider(ILogObserver)
    def show(event: dict[str, Any]) -> None:
        # The pusher's own log lines: every POST, chunk and PUT (its errors
        # are the FAIL line below).
        level = event.get("log_level")
        if level is not None and level.name == "error":
            return
        if str(event.get("log_namespace", "")).startswith("txregistry.upstream.push"):
            print(f"      {formatEvent(event)}", file=out)

    nonce = os.urandom(8).hex()
    small = _Bytes(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
                "config": {"Labels": {"txregistry.doctor": nonce}},
            }
        ).encode()
    )
    large = GeneratedBlob(chunk + (1 << 20))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": str(small.digest), "size": small.size},
            "layers": [{"mediaType": LAYER_TYPE, "digest": str(large.digest), "size": large.size}],
        }
    ).encode()
    manifest_digest = Digest.of(manifest)
    steps: list[tuple[str, Any]] = [
        (
            f"small blob ({small.size} bytes)",
            lambda: pusher.push_blob(repository, small.digest, small.size, small),
        ),
        (
            f"large blob ({format_size(large.size)}, more than push_chunk_size)",
            lambda: pusher.push_blob(repository, large.digest, large.size, large),
        ),
        (
            f"manifest ({TAG})",
            lambda: pusher.push_manifest(repository, TAG, MANIFEST_TYPE, manifest),
        ),
    ]
    globalLogPublisher.addObserver(show)
    failed: RegistryError | None = None
    failed_step = ""
    try:
        for name, step in steps:
            print(f"  {name}", file=out)
            try:
                await step()
            except RegistryError as e:
                failed, failed_step = e, name
                print(f"  FAIL  {name}: {e.message}", file=out)
                break
            print(f"  ok    {name}", file=out)
    finally:
        globalLogPublisher.removeObserver(show)

    print("  clean-up", file=out)
    for what, path in (
        ("manifest", f"manifests/{manifest_digest}"),
        ("small blob", f"blobs/{small.digest}"),
        ("large blob", f"blobs/{large.digest}"),
    ):
        status = await pusher.delete(repository, path)
        print(f"    DELETE {what}: {_deleted(status)}", file=out)

    if failed is not None:
        cause = getattr(failed, "cause", None)
        step = getattr(failed, "step", "")
        where = f"{failed_step}, {step}" if step else failed_step
        print(f"  conclusion: the push failed at the {where}: {cause or failed.message}", file=out)
        return 1
    print(f"  conclusion: ok: {registry.name} takes pushes through txregistry", file=out)
    return 0


def _deleted(status: int | None) -> str:
    if status is None:
        return "no answer"
    if status in (200, 202):
        return "deleted"
    if status == 404:
        return "nothing to delete"
    if status == 405:
        return "not allowed by the registry (HTTP 405), left in place"
    return f"HTTP {status}, left in place"
