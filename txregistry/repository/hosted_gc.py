"""
Collecting what hosted registries no longer need: C{txregistry cache gc}.

Live content is what a hosted repository's manifest records
(L{txregistry.repository.hosted.membership_key}) name: those manifests, the
manifests an index among them lists, and every blob any of them names.
Pinned manifests and blobs that nothing live names are removed, once they
have not been stored or read for C{grace} seconds.

The grace period is what makes this safe against pushes in progress: a
blob is stored when its upload ends, and its manifest comes later (a big
image's other layers may take minutes).  Blobs still being uploaded are not
in the store at all (they are staged), and the manifest check reads every
blob a pushed manifest names, which starts its grace period again.
Unpinned content (the pull-through cache's) is eviction's business, never
this one's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from txregistry.oci.errors import RegistryError
from txregistry.oci.mediatypes import INDEX_TYPES
from txregistry.oci.reference import Digest
from txregistry.storage.interface import BLOB, MANIFEST, TAG, IStorage

DEFAULT_GRACE = 3600.0

log = Logger()


@dataclass
class Collected:
    """What a collection removed, and what it kept for the grace period."""

    manifests: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    kept_for_grace: int = 0


def _record_digest(key: str) -> str | None:
    """The manifest digest of a hosted record C{<registry>/<repository>@<digest>}."""
    _, at, digest = key.rpartition("@")
    return digest if at and "^" not in key else None


async def collect(storage: IStorage, now: float, grace: float = DEFAULT_GRACE) -> Collected:
    """Remove pinned manifests and blobs that no hosted manifest names any more."""
    live_manifests: set[str] = set()
    for key in await storage.pinned(TAG):
        digest = _record_digest(key)
        if digest is not None:
            live_manifests.add(digest)
    live_blobs: set[str] = set()
    todo = list(live_manifests)
    while todo:
        digest = todo.pop()
        try:
            manifest = await storage.get_manifest(Digest.parse(digest))
        except RegistryError:
            continue
        if manifest is None:
            continue
        children, blobs = _named(manifest.media_type, manifest.body)
        live_blobs.update(blobs)
        for child in children:
            if child not in live_manifests:
                live_manifests.add(child)
                todo.append(child)

    collected = Collected()
    for kind, live, removed in (
        (MANIFEST, live_manifests, collected.manifests),
        (BLOB, live_blobs, collected.blobs),
    ):
        for name, used_at in sorted((await storage.pinned(kind)).items()):
            if name in live:
                continue
            if now - used_at < grace:
                collected.kept_for_grace += 1
                continue
            if await storage.remove(kind, name):
                removed.append(name)
                log.info(
                    "gc removed {kind} {name}: no hosted manifest names it", kind=kind, name=name
                )
    return collected


def _named(media_type: str, body: bytes) -> tuple[list[str], list[str]]:
    """The manifests and the blobs a stored manifest names."""
    try:
        document: Any = json.loads(body)
    except ValueError:
        return [], []
    if not isinstance(document, dict):
        return [], []
    if media_type in INDEX_TYPES:
        return _digests(document.get("manifests")), []
    blobs = _digests(document.get("layers"))
    config = document.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        blobs.append(config["digest"])
    return [], blobs


def _digests(descriptors: Any) -> list[str]:
    if not isinstance(descriptors, list):
        return []
    return [
        d["digest"] for d in descriptors if isinstance(d, dict) and isinstance(d.get("digest"), str)
    ]
