"""
What a request can ask of a registry, whatever keeps its content.

The HTTP layer parses a request into a L{Route} and asks an L{IRepository}
for the answer: a manifest, a blob, or a listing.  Answers are plain
objects: the HTTP layer writes them out, and never sees where the bytes
came from (storage, a download in progress, an upstream response) beyond
the L{ByteSource} or the stream it is handed.  Pull-through
(L{txregistry.repository.pullthrough}) implements it today; hosted and
push-through repositories will implement it, with uploads, tomorrow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IProtocol
from zope.interface import Interface

from txregistry.config import RegistryConfig
from txregistry.oci.reference import Digest, Reference
from txregistry.storage.interface import StoredBlob

if TYPE_CHECKING:
    from txregistry.repository.fill import BlobFill

HIT = "HIT"
MISS = "MISS"
STALE = "STALE"


class Kind(Enum):
    """What a /v2/ request asks for."""

    MANIFEST = "manifests"
    BLOB = "blobs"
    TAGS = "tags"
    REFERRERS = "referrers"
    # Pushes: an upload session, C{blobs/uploads/[<id>]}.
    UPLOADS = "uploads"


@dataclass(frozen=True)
class Route:
    """
    A parsed /v2/ request.

    @ivar repository: the name to use upstream, with Docker Hub's
        C{library/} already added.
    @ivar prefix: the registry path prefix the client used, or C{""}.
    @ivar peer: the fleet peer that sent the request, if one did: such a
        request is never passed on to another peer.
    """

    registry: RegistryConfig
    repository: str
    kind: Kind
    reference: Reference | None = None

    prefix: str = ""
    peer: str | None = None
    # For Kind.UPLOADS: the upload's id, or "" for a new one (a POST).
    upload: str = ""

    @property
    def digest(self) -> Digest:
        assert isinstance(self.reference, Digest)
        return self.reference

    def describe(self) -> str:
        """A short description for logs and errors, like C{library/alpine:3.20}."""
        if isinstance(self.reference, Digest):
            return f"{self.repository}@{self.reference}"
        if self.reference is not None:
            return f"{self.repository}:{self.reference}"
        return f"{self.repository} {self.kind.value}"


@dataclass(frozen=True)
class ManifestAnswer:
    """A manifest to send; C{body} is L{None} for a HEAD."""

    digest: str
    media_type: str
    size: int
    body: bytes | None
    cache: str


@dataclass(frozen=True)
class BlobHit:
    """A verified blob from storage; its receiver must release its source."""

    blob: StoredBlob
    cache: str = HIT


@dataclass(frozen=True)
class BlobFilling:
    """
    A blob being downloaded, to be followed as it grows.  The answer holds a
    reference to the fill, which its receiver must release.
    """

    fill: BlobFill

    @property
    def cache(self) -> str:
        # A fill that has completed is verified and staged, waiting only to
        # be committed: its bytes no longer come from upstream.
        return HIT if self.fill.is_complete() else MISS


@dataclass(frozen=True)
class BlobStream:
    """
    A blob to pipe straight through to one client, uncached: C{deliver}
    hands its body to a protocol, which must check it against C{digest}.
    """

    digest: Digest
    size: int | None
    deliver: Callable[[IProtocol], None]
    on_data: Callable[[int], None]
    cache: str = MISS


@dataclass(frozen=True)
class BlobHead:
    """The answer to a HEAD that missed the cache."""

    size: int | None
    cache: str = MISS


BlobAnswer = BlobHit | BlobFilling | BlobStream | BlobHead


@dataclass(frozen=True)
class Listing:
    """A small answer passed on as it is: C{tags/list}, C{referrers}."""

    code: int
    headers: dict[str, str]
    body: bytes


class IRepository(Interface):
    """
    The registry side of the pull API.  Every method fails only with a
    L{txregistry.oci.errors.RegistryError}, which the HTTP layer sends as
    the OCI error JSON.
    """

    def manifest(route: Route, head: bool, accept: bytes) -> Awaitable[ManifestAnswer]:
        """
        A manifest by tag or digest.  C{accept} is the request's C{Accept}
        header: a tag's answer is given in a media type it allows where the
        upstream has one; by digest, the manifest is what it is.
        """

    def blob(route: Route, head: bool) -> Awaitable[BlobAnswer]:
        """A blob by digest."""

    def listing(route: Route, query: list[tuple[str, str]]) -> Awaitable[Listing]:
        """C{tags/list} or C{referrers}, with the query parameters that apply."""
