"""
A slow client costs a file offset, not memory.

Hits and misses are read from disk only as fast as the client takes them,
and a slow client does not slow the download; a blob that cannot be cached
is streamed with the client's backpressure pausing the upstream.
"""

import os

from harness.memory import BufferedTransport, MemoryRegistry
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from txregistry.http.senders import CHUNK_SIZE, StreamThrough
from txregistry.oci.reference import Digest
from txregistry.sockets import READ_SIZE, SEND_SIZE, read_in_large_pieces, send_in_large_pieces

LIMIT = 128 * 1024
# What may wait in the client's buffer: the limit, the chunk that crossed
# it, and the response headers.
BOUND = LIMIT + CHUNK_SIZE + 1024


def drain_until_complete(client, transport, pump=lambda: None):
    for _ in range(10_000):
        response = client.response()
        if response.complete:
            return response
        transport.drain()
        pump()
    raise AssertionError("the response never completed")


def test_slow_client_of_a_hit_is_sent_only_what_it_reads(tmp_path):
    registry = MemoryRegistry(tmp_path)
    blob = os.urandom(4 << 20)
    digest = registry.upstream.add_blob(blob)
    registry.get(f"/v2/alpine/blobs/{digest}")

    transport = BufferedTransport(LIMIT)
    client = registry.client(transport)
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    assert transport.paused and len(transport.value()) <= BOUND
    response = drain_until_complete(client, transport)
    assert (response.body, response.headers["x-cache"]) == (blob, "HIT")
    assert transport.peak <= BOUND


def test_slow_client_of_a_miss_does_not_slow_the_download(tmp_path):
    registry = MemoryRegistry(tmp_path)
    blob = os.urandom(4 << 20)
    digest = registry.upstream.add_blob(blob)
    requests = registry.upstream.hold_blob(digest)
    transport = BufferedTransport(LIMIT)
    client = registry.client(transport)
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    (upstream,) = requests

    piece = 256 * 1024
    for offset in range(0, len(blob) - piece, piece):
        upstream.write(blob[offset : offset + piece])
        registry.pump()
    upstream.write(blob[-piece:])
    upstream.finish()
    registry.pump()
    # The whole blob arrived and was stored while the client read nothing.
    assert transport.paused and transport.peak <= BOUND
    assert registry.storage.open_blob(Digest.parse(digest)).result is not None

    response = drain_until_complete(client, transport, registry.pump)
    assert (response.body, response.headers["x-cache"]) == (blob, "MISS")
    assert transport.peak <= BOUND


class Capture(Resource):
    """Hands the test each request, unanswered."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


def test_stream_through_pauses_the_upstream_for_a_slow_client():
    capture = Capture()
    channel = Site(capture).buildProtocol(None)
    client = BufferedTransport(LIMIT)
    channel.makeConnection(client)
    channel.dataReceived(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
    (request,) = capture.requests

    blob = os.urandom(2 << 20)
    stream = StreamThrough(request, Digest.of(blob), len(blob))
    request.setHeader(b"Content-Length", str(len(blob)).encode())
    upstream = StringTransport()
    stream.makeConnection(upstream)

    offset, pauses = 0, 0
    while offset < len(blob):
        if upstream.producerState == "paused":
            # A real upstream connection delivers nothing while paused.
            pauses += 1
            client.drain()
            assert upstream.producerState == "producing"
            continue
        stream.dataReceived(blob[offset : offset + 65536])
        offset += 65536
    stream.connectionLost(Failure(ResponseDone()))
    client.drain()

    # Paused about once for every LIMIT bytes the client had not yet read.
    assert pauses >= len(blob) // (LIMIT + 2 * 65536)
    assert client.peak <= BOUND
    body = client.delivered.split(b"\r\n\r\n", 1)[1]
    assert body == blob


def test_sockets_are_given_large_reads_and_sends_even_under_tls() -> None:
    socket_transport = FileDescriptor(MemoryReactor())
    assert socket_transport.SEND_LIMIT < SEND_SIZE and socket_transport.bufferSize < READ_SIZE

    class TLSLayer:
        transport = socket_transport

    send_in_large_pieces(TLSLayer())
    read_in_large_pieces(TLSLayer())
    assert (socket_transport.SEND_LIMIT, socket_transport.bufferSize) == (SEND_SIZE, READ_SIZE)
    assert FileDescriptor.SEND_LIMIT < SEND_SIZE, "only that connection is changed"
    assert FileDescriptor.bufferSize < READ_SIZE
    send_in_large_pieces(StringTransport())  # not a socket: left alone
