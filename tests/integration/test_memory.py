"""
Streaming a large blob through a real txregistry process keeps its memory
flat, cold (downloaded while served) and warm (served from disk), and so
does pushing a 1 GiB layer to a hosted registry.
"""

import hashlib
import http.client
import random
import signal

import pytest
from harness.twistd import start_in_front_of

from txregistry.config import UpstreamConfig
from txregistry.repository.fill import FillPolicy
from txregistry.repository.segments import AHEAD_BUFFER, READ_BACK

pytestmark = pytest.mark.integration

BLOB_SIZE = 256 << 20
# Peak RSS may grow by this much while the blob streams: the window of
# bytes received but not yet on disk, what each segment after the first
# holds while its write to the file is pending (and one in flight), a
# read-back, and buffers of a few chunks, not the blob.  Holding the blob
# would add BLOB_SIZE.
ALLOWED_GROWTH = (
    FillPolicy().relay_window
    + (UpstreamConfig().segments - 1) * 2 * AHEAD_BUFFER
    + READ_BACK
    + (4 << 20)
)


def blob_chunks():
    rng = random.Random(256)
    block = rng.randbytes(1 << 20)
    for i in range(BLOB_SIZE >> 20):
        # Vary each MiB so that the blob is not one block repeated.
        yield i.to_bytes(8, "big") + block[8:]


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def fetch(port: int, path: str) -> tuple[str, int, str]:
    """GET a blob, reading and hashing it 1 MiB at a time."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", path)
    response = connection.getresponse()
    digest = hashlib.sha256()
    size = 0
    while chunk := response.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    cache = response.headers["X-Cache"]
    connection.close()
    return "sha256:" + digest.hexdigest(), size, cache


def test_memory_stays_flat_while_a_large_blob_streams(tmp_path, upstream):
    digest = upstream.registry.upload_blob("library/large", blob_chunks)
    small = upstream.registry.upload_blob("library/large", lambda: iter([b"warm-up"]))
    process, _, port = start_in_front_of(tmp_path, upstream.url)
    try:
        pid = process.popen.pid
        # Exercise every code path once, so that what follows measures
        # streaming, not first-use allocations.
        for _ in range(2):
            assert fetch(port, f"/v2/library/large/blobs/{small}")[0] == small
        baseline = peak_rss(pid)

        assert fetch(port, f"/v2/library/large/blobs/{digest}") == (digest, BLOB_SIZE, "MISS")
        cold = peak_rss(pid)
        assert fetch(port, f"/v2/library/large/blobs/{digest}") == (digest, BLOB_SIZE, "HIT")
        warm = peak_rss(pid)
    finally:
        process.signal(signal.SIGTERM)
        process.wait_exit()
    growth_kib = {"cold": (cold - baseline) >> 10, "warm": (warm - baseline) >> 10}
    print(f"peak RSS {baseline >> 20} MiB; growth while streaming, KiB: {growth_kib}")
    assert cold - baseline < ALLOWED_GROWTH, f"cold: +{(cold - baseline) >> 20} MiB"
    assert warm - baseline < ALLOWED_GROWTH, f"warm: +{(warm - baseline) >> 20} MiB"


PUSH_SIZE = 1 << 30
# A push may run ahead of the disk by the upload window before reading
# from the client pauses, plus Twisted's and the kernel's buffers.
PUSH_GROWTH = (8 << 20) + (8 << 20)


def push_chunks():
    rng = random.Random(1024)
    block = rng.randbytes(1 << 20)
    for i in range(PUSH_SIZE >> 20):
        yield i.to_bytes(8, "big") + block[8:]


def test_memory_stays_flat_while_a_1_gib_layer_is_pushed(tmp_path):
    from harness.twistd import start, write_config

    config = write_config(
        tmp_path,
        f"""
        [server]
        listen = ["tcp:0:interface=127.0.0.1"]
        admin_listen = []
        [cache]
        directory = "{tmp_path / "cache"}"
        [[registry]]
        name = "local"
        hosted = true
        """,
    )
    expected = hashlib.sha256()
    for chunk in push_chunks():
        expected.update(chunk)
    digest = "sha256:" + expected.hexdigest()
    process, _, port = start(tmp_path, config)
    try:
        pid = process.popen.pid
        for _ in range(2):
            _push(port, [b"warm-up"], "sha256:" + hashlib.sha256(b"warm-up").hexdigest())
        baseline = peak_rss(pid)
        # Docker's style, the one whose length is unknown: one chunked PATCH.
        _push(port, push_chunks(), digest)
        pushed = peak_rss(pid)
        assert fetch(port, f"/v2/local/big/blobs/{digest}") == (digest, PUSH_SIZE, "HIT")
    finally:
        process.signal(signal.SIGTERM)
        process.wait_exit()
    growth_kib = (pushed - baseline) >> 10
    print(f"peak RSS {baseline >> 20} MiB; growth while pushing 1 GiB: {growth_kib} KiB")
    assert pushed - baseline < PUSH_GROWTH, f"+{(pushed - baseline) >> 20} MiB"


def _push(port: int, chunks, digest: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("POST", "/v2/local/big/blobs/uploads/", body=b"")
    started = connection.getresponse()
    started.read()
    assert started.status == 202
    location = started.headers["Location"]
    connection.request("PATCH", location, body=chunks, encode_chunked=True)
    patched = connection.getresponse()
    patched.read()
    assert patched.status == 202, patched.status
    connection.request("PUT", f"{location}?digest={digest}", body=b"")
    done = connection.getresponse()
    body = done.read()
    assert done.status == 201, body
    connection.close()
