"""
Upkeep of a backend, over the storage interface, so that it works for
every backend: figures, re-hashing what is stored, and eviction now.

The command line (C{txregistry cache stats|verify|gc}) runs these with a
backend whose runner works inline, so each returns at once.  The service's
background scrub (L{txregistry.storage.scrub}) re-hashes with L{check}, as
C{cache verify} does, at a bounded rate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from txregistry.oci.reference import Digest
from txregistry.storage.interface import (
    BLOB,
    KINDS,
    MANIFEST,
    ByteSource,
    IStorage,
    StorageFigures,
)
from txregistry.storage.runner import BlockingRunner, run_inline

READ_SIZE = 1 << 20


@dataclass(frozen=True)
class Stats:
    figures: StorageFigures
    by_kind: dict[str, int]


async def stats(storage: IStorage) -> Stats:
    """Sizes and entries, in all, pinned, and by kind."""
    await storage.update_figures()
    by_kind = {kind: len(await storage.entries(kind)) for kind in KINDS}
    return Stats(storage.figures, by_kind)


async def verify(storage: IStorage, run: BlockingRunner = run_inline) -> tuple[int, list[str]]:
    """
    Re-hash every blob and manifest, and remove those that do not match
    their digest or their size.  Returns how many were checked, and the
    removed keys.
    """
    checked, removed = 0, []
    for kind in (BLOB, MANIFEST):
        for name in await storage.entries(kind):
            outcome = await check(storage, run, kind, Digest.parse(name))
            if outcome is GONE:
                continue  # evicted meanwhile
            checked += 1
            if outcome is DROPPED:
                removed.append(f"{kind}/{name}")
    return checked, removed


Pace = Callable[[int], Awaitable[None]]
GONE, SOUND, DROPPED = "gone", "sound", "dropped"


async def _unpaced(size: int) -> None:
    return None


async def check(
    storage: IStorage,
    run: BlockingRunner,
    kind: str,
    digest: Digest,
    pace: Pace = _unpaced,
    read_size: int = READ_SIZE,
) -> str:
    """
    Re-hash one blob or manifest, reading through C{run}, and drop it if it
    fails: L{SOUND}, L{DROPPED}, or L{GONE} (it was not there).  C{pace}
    is awaited with the size of each read of a blob before it is made (of a
    manifest, after), which is how the scrub bounds its rate.

    The storage's own checks on reading (a blob's size, a manifest's
    digest) drop what fails them; the rest of a blob's bytes are hashed here.
    """
    before = storage.corrupt_removed
    if kind == MANIFEST:
        manifest = await storage.get_manifest(digest, touch=False)
        if manifest is not None:
            # Its size is known only once read: charged afterwards.
            await pace(len(manifest.body))
            return SOUND
        return DROPPED if storage.corrupt_removed > before else GONE
    blob = await storage.open_blob(digest, touch=False)
    if blob is None:
        return DROPPED if storage.corrupt_removed > before else GONE
    problem = None
    try:
        hasher = digest.hasher()
        offset = 0
        while offset < blob.size:
            length = min(read_size, blob.size - offset)
            await pace(length)
            read = await run(_hash_range, blob.source, hasher, offset, length)
            if not read:
                problem = f"its file ends at byte {offset} of {blob.size}"
                break
            offset += read
        if problem is None and hasher.hexdigest() != digest.hex:
            problem = f"its {blob.size} bytes hash to {digest.algorithm}:{hasher.hexdigest()}"
    except OSError as e:
        problem = f"reading it failed: {e.strerror or e}"
    finally:
        blob.source.release()
    if problem is None:
        return SOUND
    await storage.drop_corrupt(kind, str(digest), problem)
    return DROPPED


def _hash_range(source: ByteSource, hasher: Any, offset: int, length: int) -> int:
    """Read and hash one range (blocking: run it through the runner); how much was read."""
    data = source.read(offset, length)
    hasher.update(data)
    return len(data)


async def gc(storage: IStorage) -> int:
    """Apply the size limit now; return how many entries were evicted."""
    return await storage.evict_to_limit()
