"""Answering C{tags/list} and C{referrers}: listings passed on from the repository."""

from __future__ import annotations

from txregistry.http.exchange import Exchange
from txregistry.repository.interface import IRepository, Kind, Route

# Query parameters passed on to the repository.
_PASSED_PARAMS = {Kind.TAGS: ("n", "last"), Kind.REFERRERS: ("artifactType",)}


async def serve_listing(exchange: Exchange, route: Route, repository: IRepository) -> None:
    args = exchange.request.args or {}
    query = [
        (name, value.decode("utf-8", "replace"))
        for name in _PASSED_PARAMS[route.kind]
        for value in args.get(name.encode("ascii"), [])
    ]
    answer = await repository.listing(route, query)
    for name, value in answer.headers.items():
        if name == "Link" and route.prefix and value.startswith("</v2/"):
            # Keep the client on the path-prefixed route it used.
            value = f"</v2/{route.prefix}/" + value[len("</v2/") :]
        exchange.set(name, value)
    exchange.request.setResponseCode(answer.code)
    exchange.set("Content-Length", len(answer.body))
    exchange.finish(answer.body)
