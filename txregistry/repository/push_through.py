"""
The push-through repository: what a client pushes to a C{push = true}
registry goes on to its origin before the client is answered, so that a
failure at the origin is the client's error, and is kept in the cache as
well, so that the next pull of it is a hit.

Blobs and manifests reach it verified and checked by the upload layer
(L{txregistry.repository.push}); it sends them with
L{txregistry.upstream.push.OriginPusher}, which streams a blob from its
staged file, in chunks.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from txregistry.oci.errors import RegistryError
from txregistry.oci.reference import Digest, Tag
from txregistry.repository.interface import Route
from txregistry.repository.push import IPushTarget, PushedManifest, VerifiedBlob
from txregistry.repository.tags import tag_key
from txregistry.storage.interface import TAG, IStorage, StoredManifest, TagEntry
from txregistry.upstream.push import OriginAnswer, OriginPusher, PushFailed


@implementer(IPushTarget)
class PushThroughRepository:
    """The L{IPushTarget} of one push-through registry."""

    log = Logger()

    def __init__(self, storage: IStorage, pusher: OriginPusher, clock: IReactorTime) -> None:
        self._storage = storage
        self._pusher = pusher
        self._clock = clock

    async def blob_size(self, route: Route, digest: Digest) -> int | None:
        """
        What the origin has is what counts, since it is what will check the
        manifest.  A blob that only the cache holds (pulled from a
        digest-only mirror, or from another repository) is pushed to the
        origin from the cache now: a client that asked txregistry whether
        the blob exists was told yes by the pull side, and skipped it.
        """
        size = await self._pusher.blob_size(route.repository, digest)
        if size is not None:
            return size
        stored = await self._storage.open_blob(digest)
        if stored is None:
            return None
        try:
            self.log.info(
                "push {what}: the client did not send it, the cache has it: pushing it from there",
                what=f"{route.repository}@{digest}",
            )
            await self._pusher.push_blob(route.repository, digest, stored.size, stored.source)
        finally:
            stored.source.release()
        return stored.size

    async def has_manifest(self, route: Route, digest: Digest) -> bool:
        return await self._pusher.has_manifest(route.repository, digest)

    async def receive_blob(self, route: Route, blob: VerifiedBlob) -> None:
        await self._pusher.push_blob(route.repository, blob.digest, blob.size, blob.staged)
        try:
            stored = await blob.staged.commit(blob.digest, blob.size, pinned=False)
        except Exception as e:
            # The push succeeded; a cache that cannot keep the blob fails no push.
            self.log.warn(
                "pushed {what}, but could not keep it in the cache: {error}",
                what=f"{route.repository}@{blob.digest}",
                error=str(e),
            )
            return
        if not stored:
            self.log.info(
                "pushed {what}; the cache did not keep it (it is full or larger than its limit)",
                what=f"{route.repository}@{blob.digest}",
            )

    async def mount(self, route: Route, digest: Digest, from_repository: str) -> bool:
        # A mount that fails is no failure: the client uploads the blob.
        try:
            return await self._pusher.mount(route.repository, digest, from_repository)
        except PushFailed as e:
            self.log.info("mount not done, the client uploads instead: {why}", why=e.message)
            return False

    async def receive_manifest(self, route: Route, manifest: PushedManifest) -> None:
        reference = manifest.tag if manifest.tag is not None else str(manifest.digest)
        await self._pusher.push_manifest(
            route.repository, reference, manifest.media_type, manifest.body
        )
        stored = StoredManifest(manifest.media_type, manifest.body)
        await self._storage.put_manifest(manifest.digest, stored)
        if manifest.tag is not None:
            # The tag's answer, as a pull would have kept it: the next pull
            # is a hit for tag_ttl, then revalidated with the origin as usual.
            entry = TagEntry(
                str(manifest.digest), manifest.media_type, len(manifest.body), self._clock.seconds()
            )
            await self._storage.put_tag(tag_key(route, Tag(manifest.tag)), entry)

    async def delete_manifest(self, route: Route) -> None:
        reference = route.reference
        assert reference is not None
        status = await self._pusher.delete(route.repository, f"manifests/{reference}")
        if status in (200, 202):
            if isinstance(reference, Tag):
                await self._storage.remove(TAG, tag_key(route, reference))
            return
        where = f"{self._pusher.origin.url} ({route.describe()})"
        if status == 404:
            raise RegistryError.manifest_unknown(f"the origin {where} has no such manifest")
        if status == 405:
            raise RegistryError.unsupported(
                f"the origin {where} does not allow deletes (distribution needs"
                " storage.delete.enabled)",
                status=405,
            )
        answer = OriginAnswer(status, None, "" if status else "no answer")
        raise PushFailed(self._pusher.origin.url, "DELETE of the manifest", answer)
