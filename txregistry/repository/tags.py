"""
Tag policy: what a tag's answer is, how long it is trusted, when an expired
one may still be served, and tags the upstream said do not exist.

A tag has one answer (the digest, media type and size of what it names),
whichever client asked: the upstream is always asked with every manifest
and index type (L{upstream_accept}), so that it answers with what the tag
names, unconverted.  It serves every client whose C{Accept} includes its
media type.  It is reused for C{tag_ttl}, then revalidated with a HEAD,
which does not count against Docker Hub's pull limit.  If the upstream
cannot answer (every mirror failed or rate-limited us), the expired answer
is served as C{STALE}.  A tag the upstream says does not exist is
remembered as missing for C{negative_ttl}, unless the upstream said so
because of the C{Accept} header.
"""

from __future__ import annotations

from twisted.logger import Logger

from txregistry.oci.errors import RegistryError
from txregistry.oci.mediatypes import MANIFEST_TYPES, upstream_accept
from txregistry.oci.reference import Tag
from txregistry.repository.interface import Route
from txregistry.storage.interface import TAG, IStorage, TagEntry
from txregistry.upstream.errors import UpstreamNotFound, UpstreamRefused, UpstreamUnavailable

# Past this many remembered missing tags, expired ones are forgotten.
_MISSING_PRUNE_AT = 4096

# What the upstream is asked for a tag: see upstream_accept.
TAG_ACCEPT = upstream_accept()

log = Logger()


def tag_key(route: Route, tag: Tag) -> str:
    """
    The storage key of a tag's answer.  It never holds a C{#}, which the
    keys of earlier versions always did (see L{migrate_tag_answers}).
    """
    return f"{route.registry.name}/{route.repository}:{tag}"


def can_serve_stale(error: Exception) -> bool:
    """Whether an upstream failure lets an expired tag be served from storage."""
    if isinstance(error, UpstreamRefused):
        return error.status == 429
    return isinstance(error, UpstreamUnavailable)


def refused_for_accept(error: UpstreamNotFound) -> bool:
    """
    Whether a 404 says the manifest exists but the C{Accept} header does
    not allow it, as distribution's "OCI manifest found, but accept header
    does not support OCI manifests" does: that is no proof the tag is
    missing, so it is not remembered.
    """
    return "accept" in error.message.lower()


class MissingTags:
    """Tags the upstream said do not exist, each until its time is up."""

    def __init__(self, negative_ttl: float) -> None:
        self._ttl = negative_ttl
        self._until: dict[str, float] = {}

    def check(self, route: Route, key: str, now: float) -> None:
        """
        @raise RegistryError: 404, if the upstream said so within C{negative_ttl}.
        """
        until = self._until.get(key)
        if until is not None and now < until:
            raise RegistryError.manifest_unknown(
                f"{route.registry.name}/{route.describe()}: manifest unknown"
                f" (the upstream said so {self._ttl - (until - now):.0f}s ago)"
            )

    def remember(self, key: str, now: float) -> None:
        if self._ttl <= 0:
            return
        if len(self._until) >= _MISSING_PRUNE_AT:
            self._until = {k: t for k, t in self._until.items() if t > now}
        self._until[key] = now + self._ttl


async def migrate_tag_answers(storage: IStorage) -> tuple[int, int]:
    """
    Bring tag answers kept by an earlier txregistry into the current layout.

    It kept a tag's answer per set of accepted media types, under
    C{<tag key>#<types, sorted, comma-joined>}, and asked the upstream with
    the client's own C{Accept}.  An answer asked with all four manifest and
    index types is what the tag names, unconverted, and becomes the tag's
    answer (the most recently confirmed one, if several); any other (asked
    with fewer types, or with C{*/*}) may be a conversion, or a 404
    distribution gave for the header, and is dropped.  Old entries are
    removed either way, so this finds nothing to do on later starts.

    @return: how many tags kept an answer, and how many old answers were dropped.
    """
    kept: dict[str, TagEntry] = {}
    dropped = 0
    for name in await storage.entries(TAG):
        key, marker, accepted = name.partition("#")
        if not marker:
            continue
        entry = await storage.get_tag(name)
        await storage.remove(TAG, name)
        if entry is None or not set(MANIFEST_TYPES) <= set(accepted.split(",")):
            dropped += 1
            continue
        if key not in kept or kept[key].checked_at < entry.checked_at:
            kept[key] = entry
    for key, entry in kept.items():
        current = await storage.get_tag(key)
        if current is None or current.checked_at < entry.checked_at:
            await storage.put_tag(key, entry)
    if kept or dropped:
        log.info(
            "tag answers in the earlier layout: {kept} kept, {dropped} dropped"
            " (they were asked with fewer manifest types, and are fetched again when pulled)",
            kept=len(kept),
            dropped=dropped,
        )
    return len(kept), dropped
