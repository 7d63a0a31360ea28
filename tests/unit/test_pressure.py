"""
The cache under pressure, in memory: least-recently-used eviction on a
Clock, a reader that outlives its blob's eviction, a full disk, an
unwritable directory, a crash, and a restart.
"""

import errno
import functools
import json
import os

from harness.memory import OCI_MANIFEST, BufferedTransport, MemoryRegistry

from txregistry.http import senders as sender_module
from txregistry.oci.reference import Digest
from txregistry.repository import fill as fill_module
from txregistry.repository import fills as fills_module
from txregistry.storage import staging as spool_module

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
BLOB_SIZE = 200_000


def blobs(registry, count):
    return [registry.upstream.add_blob(os.urandom(BLOB_SIZE)) for _ in range(count)]


def cached(registry, digest):
    found = registry.storage.open_blob(Digest.parse(digest)).result
    if found is not None:
        found.source.release()
    return found is not None


def test_least_recently_used_blob_is_evicted_first(tmp_path):
    # Room for two blobs and some manifests, not three blobs.
    registry = MemoryRegistry(tmp_path, size_limit=2 * BLOB_SIZE + 100_000)
    clock = registry.clock
    a, b, c = blobs(registry, 3)
    registry.get(f"/v2/x/blobs/{a}")
    clock.advance(1)
    registry.get(f"/v2/x/blobs/{b}")
    clock.advance(1)
    assert registry.get(f"/v2/x/blobs/{a}").headers["x-cache"] == "HIT"  # a is used again
    clock.advance(1)
    registry.get(f"/v2/x/blobs/{c}")
    assert (cached(registry, a), cached(registry, b), cached(registry, c)) == (True, False, True)
    assert registry.storage.evictions == 1


def test_blob_being_read_survives_its_own_eviction(tmp_path):
    registry = MemoryRegistry(tmp_path, size_limit=2 * BLOB_SIZE + 100_000)
    clock = registry.clock
    a, b, c = blobs(registry, 3)
    registry.get(f"/v2/x/blobs/{a}")
    slow = BufferedTransport(16 * 1024)
    reader = registry.client(slow)
    clock.advance(1)
    reader.send("GET", f"/v2/x/blobs/{a}")
    assert slow.paused
    for digest in (b, c):
        clock.advance(1)
        registry.get(f"/v2/x/blobs/{digest}")
    assert not cached(registry, a), "a was evicted while being read"
    for _ in range(200):
        slow.drain()
    assert reader.response().body == registry.upstream.blobs[a]
    assert reader.response().headers["x-cache"] == "HIT"


def test_manifests_and_tags_count_towards_the_limit(tmp_path):
    registry = MemoryRegistry(tmp_path, size_limit=60_000)
    clock = registry.clock
    big = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "pad": "x" * 40_000}).encode()
    registry.upstream.add_manifest("library/a", "1", big)
    registry.upstream.add_manifest("library/b", "1", big.replace(b"x", b"y"))
    registry.get("/v2/a/manifests/1")
    clock.advance(1)
    registry.get("/v2/b/manifests/1")
    assert registry.storage.evictions >= 1
    registry.storage.update_figures()
    assert registry.storage.figures.size <= 60_000


def failing_disk(monkeypatch, after: int):
    """
    Make downloads' files fail to grow past C{after} bytes, as a full disk
    would: the write that crosses the limit writes what fits, and the next
    one fails.
    """
    real_write = os.write
    state = {"written": 0}

    def write_until_full(fd, data):
        room = after - state["written"]
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        done = real_write(fd, bytes(data[:room]))
        state["written"] += done
        return done

    class FullDiskOS:
        def __getattr__(self, name):
            return write_until_full if name == "write" else getattr(os, name)

    monkeypatch.setattr(spool_module, "os", FullDiskOS())


def pull_in_pieces(registry, digest, piece=30_000):
    """A client's GET of a blob whose upstream sends it in pieces, as a real one does."""
    held = registry.upstream.hold_blob(digest)
    client = registry.client()
    client.send("GET", f"/v2/x/blobs/{digest}")
    data = registry.upstream.blobs[digest]
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    for one in pieces[:-1]:
        held[0].write(one)
        registry.pump()
    held[0].write(pieces[-1])
    held[0].finish()
    registry.pump()
    assert len(held) == 1, "one upstream request, relayed"
    return client.response()


def test_full_disk_still_serves_the_whole_verified_blob_uncached(tmp_path, monkeypatch, logs):
    registry = MemoryRegistry(tmp_path)
    # The write that fills the disk takes part of a piece, and the next fails.
    failing_disk(monkeypatch, after=50_000 + 123)
    first, second = blobs(registry, 2)
    for digest in (first, second):
        response = pull_in_pieces(registry, digest)
        assert (response.body, response.complete) == (registry.upstream.blobs[digest], True)
        assert not cached(registry, digest)
    assert registry.storage.status == "degraded"
    assert len(logs.matching("cache degraded: cannot write to the cache: No space left")) == 1
    assert list(registry.storage.tmp_directory.iterdir()) == []

    monkeypatch.undo()
    third = blobs(registry, 1)[0]
    registry.get(f"/v2/x/blobs/{third}")
    assert cached(registry, third) and registry.storage.status == "ok"
    assert len(logs.matching("cache healthy again")) == 1


def test_relaying_waits_for_the_slowest_client(tmp_path, monkeypatch):
    # Scaled down together: a sender's chunk is smaller than the window, as
    # in production (1 MiB and 8 MiB).
    monkeypatch.setattr(sender_module, "CHUNK_SIZE", 16 * 1024)
    monkeypatch.setattr(
        fills_module,
        "FillPolicy",
        functools.partial(fill_module.FillPolicy, relay_window=64 * 1024),
    )
    holds = []
    hold = fill_module.FillFromResponse.hold
    monkeypatch.setattr(
        fill_module.FillFromResponse,
        "hold",
        lambda self, held: holds.append(held) or hold(self, held),
    )
    registry = MemoryRegistry(tmp_path)
    failing_disk(monkeypatch, after=0)
    digest = blobs(registry, 1)[0]
    held = registry.upstream.hold_blob(digest)
    slow = BufferedTransport(16 * 1024)
    client = registry.client(slow)
    client.send("GET", f"/v2/x/blobs/{digest}")
    blob = registry.upstream.blobs[digest]
    held[0].write(blob[:150_000])
    registry.pump()
    assert holds[-1] is True, "the download was paused for the slow client"
    for _ in range(50):
        slow.drain()
    assert holds[-1] is False, "and resumed as it caught up"
    held[0].write(blob[150_000:])
    held[0].finish()
    registry.pump()
    for _ in range(50):
        slow.drain()
    assert client.response().body == blob and not cached(registry, digest)


def test_unwritable_download_directory_streams_through(tmp_path, logs):
    registry = MemoryRegistry(tmp_path)
    digest = blobs(registry, 1)[0]
    tmp = registry.storage.tmp_directory
    tmp.rmdir()
    tmp.write_text("not a directory")
    response = registry.get(f"/v2/x/blobs/{digest}")
    assert (response.body, response.complete, response.headers["x-cache"]) == (
        registry.upstream.blobs[digest],
        True,
        "MISS",
    )
    assert registry.storage.status == "degraded"
    assert logs.matching("cache degraded: cannot create a download file")


def test_restart_keeps_the_cache_and_the_first_pull_is_a_hit(tmp_path):
    before = MemoryRegistry(tmp_path)
    before.upstream.add_manifest("library/alpine", "1", MANIFEST)
    digest = blobs(before, 1)[0]
    before.get("/v2/alpine/manifests/1")
    before.get(f"/v2/alpine/blobs/{digest}")
    before.storage.close()

    after = MemoryRegistry(tmp_path)
    assert after.storage.crashed is False
    assert after.get("/v2/alpine/manifests/1").headers["x-cache"] == "HIT"
    assert after.get(f"/v2/alpine/blobs/{digest}").headers["x-cache"] == "HIT"
    assert after.agent.sent == []
