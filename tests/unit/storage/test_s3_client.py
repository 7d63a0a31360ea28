"""
The S3 client's requests and retries, in memory: SlowDown and 503 get a
backoff on the injected clock, and the last failure is ours to see.
"""

from __future__ import annotations

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from txregistry.config import Secret
from txregistry.storage.s3_client import Backoff, S3Client, S3Error

_SLOW_DOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


_ACCESS_DENIED = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"


class Bucket(Resource):
    """Answers with the statuses it is given, then 200; keeps what it was asked."""

    isLeaf = True

    def __init__(self, statuses: list[int]) -> None:
        super().__init__()
        self.statuses = statuses
        self.requests: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []

    def render(self, request: Request) -> bytes:
        self.requests.append(
            (request.method, request.uri, dict(request.requestHeaders.getAllRawHeaders()))
        )
        if self.statuses:
            status = self.statuses.pop(0)
            request.setResponseCode(status)
            return _SLOW_DOWN if status == 503 else _ACCESS_DENIED
        return b"stored"


def client(
    bucket: Bucket, clock: Clock, attempts: int = 4
) -> tuple[S3Client, RequestTraversalAgent]:
    agent = RequestTraversalAgent(bucket)
    s3 = S3Client(
        agent,
        clock,
        "http://s3.test:9000",
        "txr",
        "eu-west-1",
        True,
        Secret("AKIDTEST"),
        Secret("secret-key-value"),
        backoff=Backoff(attempts=attempts, first_delay=1.0, max_delay=8.0),
        jitter=lambda: 1.0,
    )
    return s3, agent


def test_slow_down_and_503_are_retried_after_a_growing_backoff() -> None:
    clock = Clock()
    bucket = Bucket([503, 503])
    s3, agent = client(bucket, clock)
    done = Deferred.fromCoroutine(s3.put_object("cache/tags/x", b"{}"))
    agent.flush()
    assert len(bucket.requests) == 1
    clock.advance(0.99)
    agent.flush()
    assert len(bucket.requests) == 1, "the first retry waits a second"
    clock.advance(0.01)
    agent.flush()
    assert len(bucket.requests) == 2
    clock.advance(1.99)
    agent.flush()
    assert len(bucket.requests) == 2, "the second waits two"
    clock.advance(0.01)
    agent.flush()
    assert len(bucket.requests) == 3
    assert done.called and done.result is None
    assert s3.retries == 2
    method, uri, headers = bucket.requests[0]
    assert (method, uri) == (b"PUT", b"/txr/cache/tags/x")
    assert headers[b"Authorization"][0].startswith(b"AWS4-HMAC-SHA256 Credential=AKIDTEST/")
    assert b"/eu-west-1/s3/aws4_request" in headers[b"Authorization"][0]


def test_the_last_failure_is_raised_once_the_attempts_are_spent() -> None:
    clock = Clock()
    bucket = Bucket([503, 503, 503])
    s3, agent = client(bucket, clock, attempts=2)
    done = Deferred.fromCoroutine(s3.put_object("k", b"x"))
    agent.flush()
    clock.advance(1)
    agent.flush()
    assert len(bucket.requests) == 2
    failure = done.result
    done.addErrback(lambda _: None)
    assert isinstance(failure.value, S3Error)
    assert "SlowDown" in str(failure.value) and "secret-key-value" not in str(failure.value)
    assert not clock.getDelayedCalls()


def test_a_client_error_is_not_retried() -> None:
    clock = Clock()
    bucket = Bucket([403])
    s3, agent = client(bucket, clock)
    done = Deferred.fromCoroutine(s3.put_object("k", b"x"))
    agent.flush()
    agent.flush()
    assert len(bucket.requests) == 1
    assert not clock.getDelayedCalls(), "no retry is waiting"
    with pytest.raises(S3Error):
        done.result.raiseException()
    done.addErrback(lambda _: None)


def test_virtual_host_style_puts_the_bucket_in_the_host() -> None:
    s3, _ = client(Bucket([]), Clock())
    s3.path_style = False
    assert s3.url("a b/c") == "http://txr.s3.test:9000/a%20b/c"
    s3.path_style = True
    assert s3.url("k", {"uploadId": "x/y", "partNumber": "2"}) == (
        "http://s3.test:9000/txr/k?partNumber=2&uploadId=x%2Fy"
    )
