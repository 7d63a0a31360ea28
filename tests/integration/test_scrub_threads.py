"""
The scrub as the service runs it: reads and hashes on the storage's thread
pool, with the real reactor, over a disk store with one rotten blob.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from txregistry.oci.reference import Digest
from txregistry.storage.disk import DiskStorage
from txregistry.storage.runner import in_thread_pool
from txregistry.storage.scrub import Scrubber

pytestmark = pytest.mark.integration


@pytest_twisted.ensureDeferred
async def test_the_scrub_on_threads_drops_a_rotten_blob(tmp_path: Path, logs):
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-scrub")
    pool.start()
    run = in_thread_pool(reactor, pool)
    storage = DiskStorage(tmp_path / "cache", 1 << 30, run)
    storage.start()
    try:
        blobs = []
        for _ in range(3):
            data = os.urandom(3 << 20)  # more than one read each
            digest = Digest.of(data)
            staged = storage.stage_blob(digest)
            staged.append(data)
            await staged.seal()
            assert await staged.commit(digest, len(data))
            staged.close()
            blobs.append(digest)
        path = Path(storage._where(storage._cache, f"blob/{blobs[1]}"))
        with open(path, "r+b") as f:
            f.seek(2 << 20)
            f.write(b"\0rot")
        scrubber = Scrubber(storage, run, reactor, rate=1 << 40)
        await scrubber.scrub_once()
        assert scrubber.dropped == 1 and scrubber.checked_bytes == 9 << 20
        assert await storage.entries("blob") == sorted(str(d) for d in (blobs[0], blobs[2]))
        assert logs.matching(f"removed corrupt cache blob {blobs[1]} ({path})")
    finally:
        storage.stop()
        pool.stop()
