"""
What a registry that takes pushes implements, and what it is handed.

The HTTP layer (L{txregistry.http.uploads}) runs the upload protocol: it
keeps the upload sessions (L{txregistry.repository.uploads}), streams each
body into a staged blob of the storage while it is hashed, checks the
digest, and checks a pushed manifest (JSON, media type, size, every blob it
names present).  Only then does it hand the result to the registry's
L{IPushTarget}: a verified blob, or a checked manifest.  Nothing partial or
unverified ever reaches a target, so a target never needs to check again.

Two kinds of registry implement it: hosted (L{txregistry.repository.hosted},
which stores what it is given, pinned) and push-through (which sends it on
to the origin, and keeps it in the cache as well).  A registry with no
target refuses pushes with 403 C{DENIED}.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass

from zope.interface import Interface

from txregistry.oci.pushed import PushedManifest
from txregistry.oci.reference import Digest
from txregistry.repository.interface import Route
from txregistry.storage.interface import IStagedBlob


@dataclass(frozen=True)
class VerifiedBlob:
    """
    A blob a client uploaded, whose digest and size are checked.

    C{staged} is sealed: its bytes can be read back (C{staged.read(offset,
    length)}, any offset below C{size}) and committed to storage under
    C{digest} (C{staged.commit(digest, size, pinned=...)}).  The upload
    layer owns it: once L{IPushTarget.receive_blob} has finished, whether it
    succeeded or failed, the upload layer aborts what was not committed and
    closes it, so a target must neither abort nor close it, nor read it
    after returning.
    """

    digest: Digest
    size: int
    staged: IStagedBlob


__all__ = ["IPushTarget", "PushedManifest", "VerifiedBlob"]


class IPushTarget(Interface):
    """
    A registry that takes pushes.  Every method fails only with a
    L{txregistry.oci.errors.RegistryError}, which the HTTP layer sends as
    the OCI error JSON (the client's error); a target says in it what
    failed, where, and what to do.

    C{route.registry} is the target's registry, C{route.repository} the
    repository pushed to (with Docker Hub's C{library/} added, as for
    pulls).
    """

    def blob_size(route: Route, digest: Digest) -> Awaitable[int | None]:
        """
        The size of blob C{digest} if the target has it, else L{None}: for a
        HEAD of a blob before a push, a mount, and the manifest check.
        """

    def has_manifest(route: Route, digest: Digest) -> Awaitable[bool]:
        """Whether the target has manifest C{digest}, for an index's check."""

    def receive_blob(route: Route, blob: VerifiedBlob) -> Awaitable[None]:
        """
        Keep a verified blob, before the client is told 201 Created: a
        hosted registry commits it pinned; push-through sends it to the
        origin (reading it from C{blob.staged}) and commits it to the cache.
        """

    def mount(route: Route, digest: Digest, from_repository: str) -> Awaitable[bool]:
        """
        Make blob C{digest} of C{from_repository} (in the same registry)
        part of C{route.repository}: whether it did (201 Created); if not,
        the client gets a new upload (202 Accepted).
        """

    def receive_manifest(route: Route, manifest: PushedManifest) -> Awaitable[None]:
        """Keep a checked manifest, and point its tag at it if it has one."""

    def delete_manifest(route: Route) -> Awaitable[None]:
        """
        Delete a manifest by digest (C{route.reference} is a L{Digest}) or a
        tag (then only the tag goes).  Fails with 404 C{MANIFEST_UNKNOWN}
        when there is no such thing, or 405 C{UNSUPPORTED} when the target
        cannot delete.
        """
