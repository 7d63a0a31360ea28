"""
Small helpers for reading upstream HTTP responses.

treq's C{collect} and C{content} have no size limit, and an upstream that
sends an endless "manifest" or token must not exhaust memory, so bodies that
are read whole go through L{read_body} with a limit.
"""

from __future__ import annotations

from typing import Any, TypeVar

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

T = TypeVar("T")


class TimedOut(Exception):
    """No answer came within the time allowed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:g}s")
        self.seconds = seconds


async def within(seconds: float, clock: IReactorTime, request: Deferred[T]) -> T:
    """
    Wait for C{request}, cancelling it after C{seconds}.  Raises L{TimedOut}
    if the time ran out, however the cancelled request chose to end: an
    Agent fails with C{ResponseNeverReceived} wrapping the cancellation, and
    a C{DeferredList} does not fail at all.
    """
    expired = []

    def expire() -> None:
        expired.append(True)
        request.cancel()

    timer = clock.callLater(seconds, expire)
    try:
        result = await request
    except Exception:
        if expired:
            raise TimedOut(seconds) from None
        raise
    finally:
        if timer.active():
            timer.cancel()
    if expired:
        raise TimedOut(seconds)
    return result


class BodyTooLarge(Exception):
    """An upstream response body was larger than we are willing to hold."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"response body larger than {limit} bytes")
        self.limit = limit


class _BoundedBodyReader(Protocol):
    """Collects a response body, aborting the connection past C{limit} bytes."""

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self._finished = finished
        self._limit = limit
        self._chunks: list[bytes] = []
        self._length = 0
        self._overflowed = False

    def dataReceived(self, data: bytes) -> None:
        if self._overflowed:
            return
        self._length += len(data)
        if self._length > self._limit:
            self._overflowed = True
            self._chunks = []
            self._finished.errback(BodyTooLarge(self._limit))
            # Nothing more is wanted from this connection.
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._overflowed:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)


def read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """Read a whole response body of at most C{limit} bytes."""
    finished: Deferred[bytes] = Deferred()
    response.deliverBody(_BoundedBodyReader(finished, limit))
    return finished


def discard_body(response: IResponse, limit: int = 1 << 16) -> None:
    """
    Drop a response body we do not need.  A short one is read to the end, so
    that the connection can go back to the pool; a long one is cut off.
    """
    read_body(response, limit).addErrback(lambda _: None)


def header(response: IResponse, name: str) -> str | None:
    """The last value of a response header, decoded, or L{None}."""
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value: Any = values[-1]
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def describe_failure(error: BaseException | Failure | None) -> str:
    """
    A plain, one-line reason for a failed request, for logs and for the 502
    a client sees: "connection refused", "no IPv4 address for <host>",
    "TLS: certificate verify failed".
    """
    if isinstance(error, Failure):
        error = error.value
    if error is None:
        return "unknown error"
    reasons = getattr(error, "reasons", None)
    if reasons:
        # ResponseFailed and ResponseNeverReceived wrap the real failures.
        return "; ".join(describe_failure(reason.value) for reason in reasons)
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, SSL.Error):
        details = (
            [part[-1] for part in error.args[0] if isinstance(part, tuple)] if error.args else []
        )
        return "TLS: " + ("; ".join(d for d in details if d) or "handshake failed")
    if isinstance(error, VerificationError):
        return f"TLS: the certificate does not match the host name ({error})"
    text = str(error).strip()
    return text or type(error).__name__
