"""Answering manifest requests."""

from __future__ import annotations

from txregistry.http.exchange import Exchange
from txregistry.repository.interface import IRepository, Route


async def serve_manifest(exchange: Exchange, route: Route, repository: IRepository) -> None:
    accept = b", ".join(exchange.request.requestHeaders.getRawHeaders(b"accept", []))
    answer = await repository.manifest(route, exchange.head, accept)
    exchange.set("Content-Type", answer.media_type)
    exchange.set("Content-Length", answer.size)
    exchange.set("Docker-Content-Digest", answer.digest)
    exchange.set("ETag", f'"{answer.digest}"')
    exchange.set("X-Cache", answer.cache)
    exchange.finish(answer.body or b"")
