"""
The HTTP face of txregistry: the OCI distribution pull API, C{/health} and
C{/metrics}.

One leaf resource parses every request (repository names contain slashes,
so Twisted's child-by-segment lookup does not fit) into a L{Route}, hands it
to the module for its kind (L{manifests}, L{blobs}, L{lists}), which asks
the L{IRepository} for an answer and writes it.  Every failure becomes the
OCI error JSON; no traceback ever reaches a client.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from txregistry.http.blobs import send_blob
from txregistry.http.bodies import SMALL_BODY_LIMIT
from txregistry.http.exchange import Exchange, Finished, error_now, json_answer, send_error
from txregistry.http.lists import serve_listing
from txregistry.http.manifests import serve_manifest
from txregistry.http.push_access import TOKEN_PATH, PushAccess
from txregistry.http.routing import Router, push_refused
from txregistry.http.uploads import ClientGone, PushAPI, discard_body
from txregistry.oci.errors import RegistryError
from txregistry.ops.metrics import CONTENT_TYPE
from txregistry.repository.interface import IRepository, Kind, Route
from txregistry.upstream.peers import PEER_HEADER

_READ_METHODS = (b"GET", b"HEAD")


class RegistryResource(Resource):
    """
    The whole HTTP API: C{/v2/...}, C{/health} and C{/metrics}.

    @param finished: told how each request ended, for the access log and
        metrics.
    @param peers: the URLs of this node's fleet peers: a request marked as
        coming from one of them is not passed on to another peer.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        router: Router,
        repository: IRepository,
        clock: IReactorTime,
        health: Callable[[], tuple[int, dict[str, Any]]],
        metrics: Callable[[], bytes] | None = None,
        finished: Callable[[Finished], None] | None = None,
        peers: Collection[str] = (),
        push: PushAPI | None = None,
        access: PushAccess | None = None,
    ) -> None:
        """
        @param push: the push API, for the registries that take pushes.
        @param access: who may push; with L{None}, nobody may.
        """
        super().__init__()
        self._peers = frozenset(peers)
        self._push = push
        self._access = access
        self._router = router
        self._repository = repository
        self._health = health
        self._metrics = metrics
        self._finished = finished
        self._clock = clock

    def render(self, request: Request) -> bytes | int:
        body = self._render(request)
        if request.method == b"HEAD" and isinstance(body, bytes) and body:
            # A HEAD answer has the GET's headers and no body (RFC 9110
            # section 9.3.2); Twisted would drop the body itself, with a
            # log line for every such answer.
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
            return b""
        return body

    def _render(self, request: Request) -> bytes | int:
        exchange = Exchange(request, self._clock, self._finished)
        path = request.path
        if path == b"/health":
            exchange.kind = "health"
            code, document = self._health()
            request.setResponseCode(code)
            return json_answer(request, document)
        if path == b"/metrics" and self._metrics is not None:
            exchange.kind = "metrics"
            request.responseHeaders.setRawHeaders(b"Content-Type", [CONTENT_TYPE.encode()])
            return self._metrics()
        request.responseHeaders.setRawHeaders(b"Docker-Distribution-API-Version", [b"registry/2.0"])
        if getattr(request, "body_too_large", False):
            return error_now(
                request,
                RegistryError(
                    413,
                    "SIZE_INVALID",
                    f"a request body outside /v2/ is at most {SMALL_BODY_LIMIT} bytes,"
                    " with a Content-Length (a token request's form is far smaller)",
                ),
            )
        if path == TOKEN_PATH and self._access is not None and request.method in (b"GET", b"POST"):
            exchange.kind = "token"
            Deferred.fromCoroutine(self._token(exchange, self._access)).addErrback(
                self._unexpected, exchange
            )
            return NOT_DONE_YET
        if request.method not in _READ_METHODS and not path.startswith(b"/v2/"):
            return error_now(request, RegistryError.unsupported("only GET and HEAD are served"))
        if path in (b"/v2", b"/v2/"):
            exchange.kind = "base"
            if request.method not in _READ_METHODS:
                return error_now(request, RegistryError.unsupported("/v2/ is only pinged"))
            access = self._access
            if access is not None and access.needs_credentials:
                if not access.ping_authorized(request):
                    # See push_access: a Bearer challenge makes every client
                    # send credentials for pushes, and still pull anonymously.
                    return error_now(
                        request,
                        access.unauthorized(
                            request, "log in to push; pulls need no credentials", None
                        ),
                    )
            return json_answer(request, {})
        try:
            ns = request.args.get(b"ns", [None])[0] if request.args else None
            route = self._router.route(path, ns)
        except RegistryError as e:
            return error_now(request, e)
        exchange.kind = route.kind.value.rstrip("s")
        peer = _peer(request, self._peers)
        if peer is not None:
            route = replace(route, peer=peer)
        if ns is not None and not route.prefix:
            # The spec's "Registry Proxying": a registry scoped by ns says so.
            request.responseHeaders.setRawHeaders(b"OCI-Namespace", [ns])
        if request.method not in _READ_METHODS or route.kind is Kind.UPLOADS:
            serving = self._serve_push(exchange, route)
        else:
            serving = self._serve(exchange, route)
        Deferred.fromCoroutine(serving).addErrback(self._unexpected, exchange)
        return NOT_DONE_YET

    async def _token(self, exchange: Exchange, access: PushAccess) -> None:
        code, document, headers = await access.token(exchange.request)
        exchange.request.setResponseCode(code)
        for name, value in headers.items():
            exchange.set(name, value)
        exchange.finish(json_answer(exchange.request, document))

    async def _serve_push(self, exchange: Exchange, route: Route) -> None:
        """A push: refused unless the registry takes pushes and the client may push."""
        try:
            target = self._push.target(route) if self._push is not None else None
            if target is None or self._push is None:
                discard_body(exchange)
                raise push_refused(route.registry)
            if self._access is None:
                discard_body(exchange)
                raise RegistryError(403, "DENIED", "pushes are turned off in this txregistry")
            await self._access.check_push(exchange.request, _client_name(route))
            await self._push.serve(exchange, route, target)
        except RegistryError as e:
            discard_body(exchange)
            send_error(exchange, e)
        except ClientGone as e:
            self.log.info(
                "client went away during {method} {path} ({reason}): an upload keeps"
                " what arrived, for the client to resume or expire",
                method=exchange.request.method.decode("ascii", "replace"),
                path=exchange.request.path.decode("ascii", "replace")[:300],
                reason=str(e),
            )

    async def _serve(self, exchange: Exchange, route: Route) -> None:
        try:
            if route.kind is Kind.MANIFEST:
                await serve_manifest(exchange, route, self._repository)
            elif route.kind is Kind.BLOB:
                send_blob(exchange, route, await self._repository.blob(route, exchange.head))
            else:
                await serve_listing(exchange, route, self._repository)
        except RegistryError as e:
            send_error(exchange, e)

    def _unexpected(self, failure: Failure, exchange: Exchange) -> None:
        self.log.failure(
            "Unexpected error serving {method} {path}",
            failure,
            method=exchange.request.method.decode("ascii", "replace"),
            path=exchange.request.path.decode("ascii", "replace")[:300],
        )
        send_error(
            exchange,
            RegistryError(500, "UNKNOWN", "internal error in txregistry; its log has the details"),
        )


def _client_name(route: Route) -> str:
    """
    The repository as the client names it (C{local/app}, with its registry
    prefix): a token scope the client asks its realm for must name that.
    """
    return f"{route.prefix}/{route.repository}" if route.prefix else route.repository


def _peer(request: Request, peers: frozenset[str]) -> str | None:
    """
    The fleet peer a request says it comes from.  Only a configured peer's
    URL counts: the mark only keeps a request from being passed on, and
    anything else is a client's request like any other.
    """
    value = request.getHeader(PEER_HEADER)
    if value is None:
        return None
    url = value.decode("latin-1")
    return url if url in peers else None
