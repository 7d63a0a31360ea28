"""
One request and how it ends: its response headers, its finish, and its
error answers, which are always the OCI error JSON and never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request

from txregistry.http.senders import abort_connection, client_host
from txregistry.oci.errors import RegistryError

__all__ = ["Exchange", "Finished", "client_host", "error_now", "json_answer", "send_error"]


@dataclass(frozen=True)
class Finished:
    """What became of one request, for the access log and metrics."""

    client: str
    method: str
    path: str
    kind: str
    status: int
    cache: str
    sent: int
    duration: float
    aborted: bool


class Exchange:
    """One request, whether its client is still there, and how it ended."""

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        finished: Callable[[Finished], None] | None,
    ) -> None:
        self.request = request
        self.gone = False
        self.kind = "other"
        self._clock = clock
        self._started = clock.seconds()
        self._finished = finished
        request.notifyFinish().addCallbacks(self._done, self._lost)

    def _lost(self, _: Failure) -> None:
        self.gone = True
        # A connection closed after its answer (one sent before the pushed
        # body arrived) is no aborted request.
        self._done(None, aborted=not self.request.finished)

    def _done(self, _: object, aborted: bool = False) -> None:
        if self._finished is None:
            return
        request = self.request
        self._finished(
            Finished(
                client=client_host(request),
                method=request.method.decode("ascii", "replace"),
                path=request.uri.decode("ascii", "replace")[:1000],
                kind=self.kind,
                status=request.code,
                cache=(request.responseHeaders.getRawHeaders(b"x-cache") or [b""])[0].decode(),
                sent=request.sentLength,
                duration=self._clock.seconds() - self._started,
                aborted=aborted,
            )
        )

    @property
    def head(self) -> bool:
        return self.request.method == b"HEAD"

    def set(self, name: str, value: str | int) -> None:
        self.request.responseHeaders.setRawHeaders(name, [str(value).encode("latin-1")])

    def finish(self, body: bytes = b"") -> None:
        if self.gone:
            return
        if body:
            self.request.write(body)
        self.request.finish()


def json_answer(request: Request, document: Any) -> bytes:
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    return json.dumps(document).encode("utf-8")


def error_now(request: Request, error: RegistryError) -> bytes:
    request.setResponseCode(error.status, error.reason_phrase())
    for name, value in error.headers.items():
        request.responseHeaders.setRawHeaders(name, [value.encode("latin-1")])
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    return error.body()


def send_error(exchange: Exchange, error: RegistryError) -> None:
    request = exchange.request
    if exchange.gone:
        return
    if request.startedWriting:
        # Too late for a status: cut the response short instead.
        abort_connection(request)
        return
    body = error_now(request, error)
    request.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode("ascii")])
    # A HEAD answer has the GET's headers and no body (RFC 9110 section 9.3.2).
    exchange.finish(b"" if exchange.head else body)
