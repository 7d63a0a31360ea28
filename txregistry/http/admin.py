"""
Admin requests, served only on C{[server] admin_listen} (loopback by
default), never on the registry's own listeners.

    GET  /admin/registries                   each registry's runtime state
    POST /admin/registries/<name>/offline    serve only what is cached
    POST /admin/registries/<name>/online     ask the upstream again
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from txregistry.http.exchange import client_host, json_answer
from txregistry.http.routing import Router
from txregistry.upstream.client import Upstream


class AdminResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, router: Router, upstreams: dict[str, Upstream]) -> None:
        super().__init__()
        self._router = router
        self._upstreams = upstreams

    def render(self, request: Request) -> bytes:
        parts = request.path.decode("ascii", "replace").strip("/").split("/")
        if parts == ["admin", "registries"] and request.method == b"GET":
            return _answer(request, 200, {"registries": self._states()})
        if (
            len(parts) == 4
            and parts[:2] == ["admin", "registries"]
            and parts[3] in ("offline", "online")
        ):
            if request.method != b"POST":
                return _answer(request, 405, {"error": "use POST"})
            registry = self._router.registry_named(parts[2])
            if registry is None:
                return _answer(
                    request, 404, {"error": f"registry {parts[2][:100]!r} is not configured"}
                )
            upstream = self._upstreams.get(registry.name)
            if upstream is None:
                return _answer(
                    request,
                    409,
                    {"error": f"registry {registry.name} is hosted: it has no upstream to leave"},
                )
            upstream.offline = parts[3] == "offline"
            self.log.warn(
                "registry {name} switched to {mode} mode by an admin request from {client}",
                name=registry.name,
                mode=parts[3],
                client=client_host(request),
            )
            return _answer(request, 200, {"registry": registry.name, "offline": upstream.offline})
        return _answer(request, 404, {"error": "no such admin request"})

    def _states(self) -> dict[str, Any]:
        return {name: {"offline": u.offline} for name, u in self._upstreams.items()}


def _answer(request: Request, code: int, document: Any) -> bytes:
    request.setResponseCode(code)
    return json_answer(request, document)
