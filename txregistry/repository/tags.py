"""
Tag policy: how long a tag's answer is trusted, when an expired one may
still be served, and tags the upstream said do not exist.

A tag's answer (which digest it names, for the client's C{Accept}) is
reused for C{tag_ttl}, then revalidated with a HEAD, which does not count
against Docker Hub's pull limit.  If the upstream cannot answer (every
mirror failed or rate-limited us), the expired answer is served as
C{STALE}.  A tag the upstream says does not exist is remembered as missing
for C{negative_ttl}.
"""

from __future__ import annotations

from txregistry.oci.errors import RegistryError
from txregistry.oci.mediatypes import accept_key
from txregistry.oci.reference import Tag
from txregistry.repository.interface import Route
from txregistry.upstream.errors import UpstreamRefused, UpstreamUnavailable

# Past this many remembered missing tags, expired ones are forgotten.
_MISSING_PRUNE_AT = 4096


def tag_key(route: Route, tag: Tag, accept: bytes) -> str:
    """The storage key of a tag's answer for one set of accepted media types."""
    return f"{route.registry.name}/{route.repository}:{tag}#{accept_key(accept)}"


def can_serve_stale(error: Exception) -> bool:
    """Whether an upstream failure lets an expired tag be served from storage."""
    if isinstance(error, UpstreamRefused):
        return error.status == 429
    return isinstance(error, UpstreamUnavailable)


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
