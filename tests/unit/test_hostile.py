"""
Hostile and broken input, in memory: whatever a client sends gets a clear
4xx or is disconnected, never a 5xx or a traceback; the service keeps
answering; and no name, path or query reaches the filesystem or makes
txregistry connect anywhere not configured.
"""

import json
import string

import pytest
from harness.memory import MemoryRegistry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Characters a request line can carry: printable ASCII but space.
PATH_CHARS = st.sampled_from(sorted(set(string.printable) - set(string.whitespace)))
SEGMENT = st.one_of(
    st.text(PATH_CHARS, min_size=0, max_size=40),
    st.sampled_from(
        ["..", ".", "%2F", "%2e%2e", "library", "ALPINE", "a" * 300, "docker.io", "localhost:5000"]
    ),
)
NAME = st.lists(SEGMENT, min_size=1, max_size=5).map("/".join)
REFERENCE = st.one_of(
    st.text(PATH_CHARS, max_size=140),
    st.builds(
        lambda a, h: f"{a}:{h}",
        st.sampled_from(["sha256", "sha512", "md5", "SHA256", ""]),
        st.text("0123456789abcdefABCDEF/.%", max_size=130),
    ),
)
HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200)

_registry = None


def registry(tmp_path_factory):
    global _registry
    if _registry is None:
        _registry = MemoryRegistry(tmp_path_factory.mktemp("hostile"))
    return _registry


def assert_clean(response):
    """A 2xx/3xx/4xx, with an OCI error body when it is an error, never a traceback."""
    assert response.status < 500, (response.status, response.body)
    assert b"Traceback" not in response.body and b'File "' not in response.body
    if response.status >= 400 and response.body:
        assert json.loads(response.body)["errors"][0]["code"]


def assert_still_answering(tx):
    assert tx.get("/v2/").status == 200


def assert_nothing_escaped(tx, tmp_path_factory):
    hosts = {s.url.split("/")[2] for s in tx.agent.sent}
    assert hosts <= {"registry-1.docker.io"}, hosts
    outside = {p.name for p in tx.storage.directory.parent.iterdir()}
    assert outside == {"cache"}, outside


SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(name=NAME, kind=st.sampled_from(["manifests", "blobs", "referrers"]), reference=REFERENCE)
def test_any_path_gets_a_clean_answer(tmp_path_factory, name, kind, reference):
    tx = registry(tmp_path_factory)
    for method in ("GET", "HEAD"):
        assert_clean(tx.get(f"/v2/{name}/{kind}/{reference}", method=method))
    assert_still_answering(tx)
    assert_nothing_escaped(tx, tmp_path_factory)


@SETTINGS
@given(query=st.text(PATH_CHARS.filter(lambda c: c != "#"), max_size=120), name=NAME)
def test_any_query_string_gets_a_clean_answer(tmp_path_factory, query, name):
    tx = registry(tmp_path_factory)
    assert_clean(tx.get(f"/v2/{name}/manifests/latest?{query}"))
    assert_clean(tx.get(f"/v2/{name}/tags/list?{query}"))
    assert_still_answering(tx)
    assert_nothing_escaped(tx, tmp_path_factory)


@SETTINGS
@given(accept=HEADER_VALUE, byte_range=HEADER_VALUE, ns=HEADER_VALUE)
def test_any_header_value_gets_a_clean_answer(tmp_path_factory, accept, byte_range, ns):
    tx = registry(tmp_path_factory)
    digest = tx.upstream.add_blob(b"some blob")
    headers = {"Accept": accept, "Range": byte_range, "X-Anything": ns}
    assert_clean(tx.get("/v2/library/alpine/manifests/latest", headers))
    assert_clean(tx.get(f"/v2/library/alpine/blobs/{digest}", headers))
    assert_still_answering(tx)


@pytest.mark.parametrize(
    "request_line, code",
    [
        ("/v2/../../../etc/passwd/manifests/x", "NAME_INVALID"),
        ("/v2/library%2Falpine/manifests/1", "NAME_INVALID"),
        ("/v2/library/alpine/blobs/sha256:..%2F..%2Fetc%2Fpasswd", "DIGEST_INVALID"),
        ("/v2/library/alpine/manifests/1?ns=127.0.0.1", "NAME_UNKNOWN"),
        ("/v2/library/alpine/manifests/1?ns=%5B::1%5D", "NAME_UNKNOWN"),
        ("/v2/library/alpine/manifests/1?ns=evil.example", "NAME_UNKNOWN"),
        ("/v2/127.0.0.1:80/x/manifests/1", "NAME_UNKNOWN"),
        ("/v2/evil.example/x/manifests/1", "NAME_UNKNOWN"),
        ("http://evil.example/v2/library/alpine/manifests/1", "NOT_FOUND"),
        ("//evil.example/v2/library/alpine/manifests/1", "NOT_FOUND"),
    ],
)
def test_path_tricks_reach_nothing(tmp_path, request_line, code):
    tx = MemoryRegistry(tmp_path)
    response = tx.get(request_line)
    assert 400 <= response.status < 500
    assert response.json()["errors"][0]["code"] == code
    assert tx.agent.sent == []
    assert {p.name for p in tmp_path.iterdir()} == {"cache"}


def raw(tx, data):
    client = tx.client()
    client.channel.dataReceived(data)
    return client


def test_oversized_headers_are_refused(tmp_path):
    tx = MemoryRegistry(tmp_path)
    client = raw(tx, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert client.transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
    assert client.transport.disconnecting
    many = raw(tx, b"GET /v2/ HTTP/1.1\r\n" + b"X-A: aaaaaaaaaaaaaaaaaaaa\r\n" * 1000 + b"\r\n")
    assert many.transport.value().startswith(b"HTTP/1.1 400")
    assert many.transport.disconnecting
    assert_still_answering(tx)


def test_invalid_request_line_is_refused(tmp_path):
    tx = MemoryRegistry(tmp_path)
    client = raw(tx, b"NOT A REQUEST\r\n\r\n")
    assert client.transport.value().startswith(b"HTTP/1.1 400")
    assert client.transport.disconnecting
    assert_still_answering(tx)


def test_trickled_headers_are_cut_off_without_disturbing_others(tmp_path):
    tx = MemoryRegistry(tmp_path)
    slow = raw(tx, b"GET /v2/ HTTP/1.1\r\n")
    for piece in (b"Hos", b"t: x", b"\r\nX-A: 1"):
        tx.site_clock.advance(9)
        slow.channel.dataReceived(piece)
        assert not slow.transport.disconnecting
        # Another client is served all the while.
        assert_still_answering(tx)
    tx.site_clock.advance(3)  # 30s since the request's first byte
    assert slow.transport.value() == (
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    assert slow.transport.disconnecting


def test_header_deadline_restarts_for_each_request(tmp_path):
    tx = MemoryRegistry(tmp_path)
    client = raw(tx, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.transport.value().startswith(b"HTTP/1.1 200")
    tx.site_clock.advance(100)
    client.transport.clear()
    client.channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.transport.value().startswith(b"HTTP/1.1 200")
    assert not client.transport.disconnecting
