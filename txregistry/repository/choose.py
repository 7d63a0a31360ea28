"""Pulls answered by the repository of each request's registry: hosted, or pull-through."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

from zope.interface import implementer

from txregistry.repository.interface import (
    BlobAnswer,
    IRepository,
    Listing,
    ManifestAnswer,
    Route,
)


@implementer(IRepository)
class ByRegistry:
    """
    Hands each pull to the repository of its registry (by name) in
    C{repositories}, or else to C{default}, the pull-through cache.
    """

    def __init__(self, default: IRepository, repositories: Mapping[str, IRepository]) -> None:
        self._default = default
        self._repositories = repositories

    def _for(self, route: Route) -> IRepository:
        return self._repositories.get(route.registry.name, self._default)

    def manifest(self, route: Route, head: bool, accept: bytes) -> Awaitable[ManifestAnswer]:
        return self._for(route).manifest(route, head, accept)

    def blob(self, route: Route, head: bool) -> Awaitable[BlobAnswer]:
        return self._for(route).blob(route, head)

    def listing(self, route: Route, query: list[tuple[str, str]]) -> Awaitable[Listing]:
        return self._for(route).listing(route, query)
