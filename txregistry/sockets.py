"""
Sizing the socket reads and sends of connections that carry blobs.

Twisted reads at most C{FileDescriptor.bufferSize} (64 KiB) per C{recv()},
and sends at most C{FileDescriptor.SEND_LIMIT} (128 KiB, a guard for old
Windows) per C{send()}.  Every read and every send is a turn of the reactor
loop and, for reads, a trip through the HTTP parser and the fill, so a
256 MiB blob in 64 KiB pieces costs four thousand of each.  These raise
both, for one connection at a time.  Under TLS the TCP transport below the
TLS protocol is the one tuned.
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor

# How much one send() may move.
SEND_SIZE = 1 << 20
# How much one recv() may take.  Larger measured slower: every recv()
# allocates a buffer of this size, and from 512 KiB on the allocator maps
# fresh pages for it (bench/RESULTS.md).
READ_SIZE = 256 << 10


def _socket_transport(transport: object) -> FileDescriptor | None:
    """The socket's own transport, below any protocol layered on it."""
    while transport is not None:
        if isinstance(transport, FileDescriptor):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def send_in_large_pieces(transport: object) -> None:
    """Let the connection hand the kernel up to L{SEND_SIZE} per send()."""
    socket = _socket_transport(transport)
    if socket is not None:
        socket.SEND_LIMIT = SEND_SIZE


def read_in_large_pieces(transport: object) -> None:
    """
    Let the connection take up to L{READ_SIZE} per recv().  (The same
    attribute is the write buffer size above which it pauses its producer;
    that matters little on a connection that sends only requests.)
    """
    socket = _socket_transport(transport)
    if socket is not None:
        socket.bufferSize = READ_SIZE
