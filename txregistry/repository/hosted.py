"""
Hosted registries: a registry of its own on this machine (C{hosted =
true}), whose content is what clients pushed to it.

Everything is kept in the one storage, pinned, so that eviction never
removes it, and it survives restarts.  No upstream is ever contacted.  Blobs
and manifests are stored by digest, as the cache keeps them; what belongs to
a repository is said by pinned records under the tag kind:

  - C{<registry>/<repository>:<tag>}: a tag, as the pull-through cache
    keeps its tag answers (L{txregistry.repository.tags.tag_key});
  - C{<registry>/<repository>@<digest>}: the repository has manifest
    C{digest} (so that a DELETE by digest is per repository);
  - C{<registry>/<repository>^<subject>^<digest>}: manifest C{digest} refers
    to C{subject}, for the referrers API.

Neither C{:} nor C{@} nor C{^} can appear in a repository name, so the
records of one repository never collide with another's.  Blobs that no
manifest names any more are removed by C{txregistry cache gc}
(L{txregistry.storage.gc}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from txregistry.oci.errors import RegistryError
from txregistry.oci.mediatypes import OCI_INDEX
from txregistry.oci.reference import Digest, Tag
from txregistry.repository.interface import (
    HIT,
    BlobAnswer,
    BlobHit,
    IRepository,
    Kind,
    Listing,
    ManifestAnswer,
    Route,
)
from txregistry.repository.push import IPushTarget, PushedManifest, VerifiedBlob
from txregistry.repository.tags import tag_key
from txregistry.storage.interface import BLOB, TAG, IStorage, StoredManifest, TagEntry

TAGS_PAGE_LIMIT = 1000


def repository_prefix(route: Route) -> str:
    return f"{route.registry.name}/{route.repository}"


def membership_key(route: Route, digest: Digest | str) -> str:
    return f"{repository_prefix(route)}@{digest}"


def referrer_key(route: Route, subject: Digest | str, digest: Digest | str) -> str:
    return f"{repository_prefix(route)}^{subject}^{digest}"


def _not_stored(what: str) -> RegistryError:
    return RegistryError(
        503,
        "UNAVAILABLE",
        f"txregistry could not store {what}; check the cache directory"
        " (disk space, permissions) and /health, then push again",
    )


@implementer(IRepository, IPushTarget)
class HostedRepository:
    """Pulls and pushes of hosted registries, all from and to storage."""

    log = Logger()

    def __init__(self, storage: IStorage, clock: IReactorTime) -> None:
        self.storage = storage
        self._clock = clock

    # Pulls.

    async def manifest(self, route: Route, head: bool, accept: bytes) -> ManifestAnswer:
        digest = await self._resolve(route)
        stored = await self.storage.get_manifest(digest)
        if stored is None:
            raise RegistryError.manifest_unknown(
                f"manifest {route.describe()} is not in hosted registry {route.registry.name}"
            )
        body = None if head else stored.body
        return ManifestAnswer(str(digest), stored.media_type, len(stored.body), body, HIT)

    async def _resolve(self, route: Route) -> Digest:
        """The digest a manifest reference names in this repository."""
        reference = route.reference
        if isinstance(reference, Digest):
            if await self.storage.get_tag(membership_key(route, reference)) is None:
                raise RegistryError.manifest_unknown(
                    f"manifest {route.describe()} is not in hosted registry {route.registry.name}"
                )
            return reference
        assert isinstance(reference, Tag)
        entry = await self.storage.get_tag(tag_key(route, reference))
        if entry is None:
            raise RegistryError.manifest_unknown(
                f"tag {route.describe()} is not in hosted registry {route.registry.name}"
            )
        return Digest.parse(entry.digest)

    async def blob(self, route: Route, head: bool) -> BlobAnswer:
        stored = await self.storage.open_blob(route.digest)
        if stored is None:
            raise RegistryError(
                404,
                "BLOB_UNKNOWN",
                f"blob {route.describe()} is not in hosted registry {route.registry.name}",
            )
        return BlobHit(stored)

    async def listing(self, route: Route, query: list[tuple[str, str]]) -> Listing:
        if route.kind is Kind.TAGS:
            return await self._tags(route, dict(query))
        return await self._referrers(route, dict(query))

    async def _tags(self, route: Route, query: dict[str, str]) -> Listing:
        prefix = repository_prefix(route) + ":"
        names = sorted(
            key[len(prefix) :] for key in await self.storage.entries(TAG) if key.startswith(prefix)
        )
        if not names:
            raise RegistryError.name_unknown(
                f"repository {route.repository!r} of hosted registry"
                f" {route.registry.name} has no tags"
            )
        last = query.get("last")
        if last:
            names = [name for name in names if name > last]
        limit = _page_limit(query.get("n"))
        headers = {"Content-Type": "application/json"}
        if limit == 0:
            names = []
        elif len(names) > limit:
            names = names[:limit]
            # As an upstream's: the HTTP layer adds the client's path prefix.
            headers["Link"] = (
                f'</v2/{route.repository}/tags/list?n={limit}&last={names[-1]}>; rel="next"'
            )
        body = json.dumps({"name": route.repository, "tags": names}).encode()
        return Listing(200, headers, body)

    async def _referrers(self, route: Route, query: dict[str, str]) -> Listing:
        prefix = f"{repository_prefix(route)}^{route.digest}^"
        wanted = query.get("artifactType")
        descriptors: list[dict[str, Any]] = []
        for key in sorted(await self.storage.entries(TAG)):
            if not key.startswith(prefix):
                continue
            entry = await self.storage.get_tag(key)
            manifest = await self.storage.get_manifest(Digest.parse(key[len(prefix) :]))
            if entry is None or manifest is None:
                continue
            descriptor = _referrer_descriptor(entry, manifest)
            if wanted and descriptor.get("artifactType") != wanted:
                continue
            descriptors.append(descriptor)
        headers = {"Content-Type": OCI_INDEX}
        if wanted:
            headers["OCI-Filters-Applied"] = "artifactType"
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
        return Listing(200, headers, body.encode())

    # Pushes.

    async def blob_size(self, route: Route, digest: Digest) -> int | None:
        stored = await self.storage.open_blob(digest)
        if stored is None:
            return None
        stored.source.release()
        return stored.size

    async def has_manifest(self, route: Route, digest: Digest) -> bool:
        return await self.storage.get_tag(membership_key(route, digest)) is not None

    async def receive_blob(self, route: Route, blob: VerifiedBlob) -> None:
        if not await blob.staged.commit(blob.digest, blob.size, pinned=True):
            raise _not_stored(f"blob {blob.digest}")
        self.log.info(
            "stored pushed blob {digest} ({size} bytes) in {repository}",
            digest=str(blob.digest),
            size=blob.size,
            repository=repository_prefix(route),
        )

    async def mount(self, route: Route, digest: Digest, from_repository: str) -> bool:
        # Blobs are kept once, by digest, for every repository: a blob in
        # storage (pushed anywhere, or pulled into the cache) is verified
        # content, and is pinned from now on.
        if await self.blob_size(route, digest) is None:
            return False
        return await self.storage.pin(BLOB, str(digest), True) or True

    async def receive_manifest(self, route: Route, manifest: PushedManifest) -> None:
        for digest in manifest.references:
            # A blob the cache pulled is now part of a hosted image.
            await self.storage.pin(BLOB, str(digest), True)
        stored = StoredManifest(manifest.media_type, manifest.body)
        if not await self.storage.put_manifest(manifest.digest, stored, pinned=True):
            raise _not_stored(f"manifest {manifest.digest}")
        entry = TagEntry(
            str(manifest.digest), manifest.media_type, len(manifest.body), self._clock.seconds()
        )
        keys = [membership_key(route, manifest.digest)]
        if manifest.subject is not None:
            keys.append(referrer_key(route, manifest.subject, manifest.digest))
        if manifest.tag is not None:
            keys.append(tag_key(route, Tag(manifest.tag)))
        for key in keys:
            if not await self.storage.put_tag(key, entry, pinned=True):
                raise _not_stored(f"manifest {manifest.digest}'s record {key}")
        self.log.info(
            "stored pushed manifest {digest} in {repository}{tag}",
            digest=str(manifest.digest),
            repository=repository_prefix(route),
            tag=f" as tag {manifest.tag}" if manifest.tag else "",
        )

    async def delete_manifest(self, route: Route) -> None:
        reference = route.reference
        if isinstance(reference, Tag):
            if not await self.storage.remove(TAG, tag_key(route, reference)):
                raise RegistryError.manifest_unknown(
                    f"tag {route.describe()} is not in hosted registry {route.registry.name}"
                )
            self.log.info("deleted tag {what}", what=f"{route.registry.name}/{route.describe()}")
            return
        assert isinstance(reference, Digest)
        if not await self.storage.remove(TAG, membership_key(route, reference)):
            raise RegistryError.manifest_unknown(
                f"manifest {route.describe()} is not in hosted registry {route.registry.name}"
            )
        # Its tags and referrer records in this repository go with it; the
        # manifest and its blobs are collected by gc once nothing names them.
        prefix = repository_prefix(route)
        for key in await self.storage.entries(TAG):
            if not key.startswith(prefix) or key[len(prefix) : len(prefix) + 1] not in ":^":
                continue
            if key.endswith(f"^{reference}"):
                await self.storage.remove(TAG, key)
                continue
            entry = await self.storage.get_tag(key)
            if entry is not None and entry.digest == str(reference) and key[len(prefix)] == ":":
                await self.storage.remove(TAG, key)
        self.log.info("deleted manifest {what}", what=f"{route.registry.name}/{route.describe()}")


def _referrer_descriptor(entry: TagEntry, manifest: StoredManifest) -> dict[str, Any]:
    descriptor: dict[str, Any] = {
        "mediaType": manifest.media_type,
        "digest": entry.digest,
        "size": len(manifest.body),
    }
    try:
        document = json.loads(manifest.body)
    except ValueError:
        return descriptor
    artifact_type = document.get("artifactType")
    if not isinstance(artifact_type, str) and isinstance(document.get("config"), dict):
        artifact_type = document["config"].get("mediaType")
    if isinstance(artifact_type, str):
        descriptor["artifactType"] = artifact_type
    if isinstance(document.get("annotations"), dict):
        descriptor["annotations"] = document["annotations"]
    return descriptor


def _page_limit(text: str | None) -> int:
    """
    C{?n=} of a tags/list: at most L{TAGS_PAGE_LIMIT}; C{0} asks for no
    tags (as distribution answers it), and a negative or non-numeric one
    is the client's error.
    """
    if text is None:
        return TAGS_PAGE_LIMIT
    try:
        limit = int(text)
    except ValueError:
        limit = -1
    if limit < 0:
        raise RegistryError(
            400,
            "PAGINATION_NUMBER_INVALID",
            f"n={text[:20]!r} of tags/list must be a whole number, 0 or more",
        )
    return min(limit, TAGS_PAGE_LIMIT)
