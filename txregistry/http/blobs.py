"""Answering blob requests: from storage, from a download in progress, or streamed through."""

from __future__ import annotations

from txregistry.http.exchange import Exchange, send_error
from txregistry.http.ranges import parse_range
from txregistry.http.senders import FileSender, StreamThrough
from txregistry.oci.errors import RegistryError
from txregistry.repository.interface import (
    BlobAnswer,
    BlobFilling,
    BlobHead,
    BlobHit,
    BlobStream,
    Route,
)
from txregistry.storage.interface import ByteSource


def send_blob(exchange: Exchange, route: Route, answer: BlobAnswer) -> None:
    request = exchange.request
    exchange.set("Content-Type", "application/octet-stream")
    exchange.set("Docker-Content-Digest", str(route.digest))
    exchange.set("X-Cache", answer.cache)
    if isinstance(answer, BlobHit):
        _send_file(exchange, answer.blob.source, answer.blob.size)
    elif isinstance(answer, BlobFilling):
        # A range inside the bytes already received is sent at once; any
        # other waits for the bytes it needs.
        _send_file(exchange, answer.fill, answer.fill.expected_size)
    elif isinstance(answer, BlobStream):
        if answer.size is not None:
            exchange.set("Content-Length", answer.size)
        stream = StreamThrough(request, answer.digest, answer.size, answer.on_data)
        if exchange.gone:
            stream.stopProducing()
        answer.deliver(stream)
    else:
        assert isinstance(answer, BlobHead)
        if answer.size is not None:
            exchange.set("Content-Length", answer.size)
        exchange.finish()


def _send_file(exchange: Exchange, source: ByteSource, size: int | None) -> None:
    """
    Send a file (cached, or still downloading), or the range of it the
    client asked for.  Takes over the caller's reference to C{source}.
    """
    start, end = 0, size
    if size is not None:
        exchange.set("Accept-Ranges", "bytes")
        try:
            byte_range = parse_range(exchange.request.getHeader(b"range"), size)
        except RegistryError as e:
            source.release()
            send_error(exchange, e)
            return
        if byte_range is not None:
            start, end = byte_range
            exchange.request.setResponseCode(206)
            exchange.set("Content-Range", f"bytes {start}-{end - 1}/{size}")
        exchange.set("Content-Length", (end or 0) - start)
    if exchange.head or exchange.gone:
        source.release()
        exchange.finish()
        return
    FileSender(source, exchange.request, start, end).begin()
