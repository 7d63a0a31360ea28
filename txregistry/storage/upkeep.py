"""
Upkeep of a backend, over the storage interface, so that it works for
every backend: figures, re-hashing what is stored, and eviction now.

The command line (C{txregistry cache stats|verify|gc}) runs these with a
backend whose runner works inline, so each returns at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from txregistry.oci.reference import Digest
from txregistry.storage.interface import BLOB, KINDS, MANIFEST, IStorage, StorageFigures

_READ_SIZE = 1 << 20


@dataclass(frozen=True)
class Stats:
    figures: StorageFigures
    by_kind: dict[str, int]


async def stats(storage: IStorage) -> Stats:
    """Sizes and entries, in all, pinned, and by kind."""
    await storage.update_figures()
    by_kind = {kind: len(await storage.entries(kind)) for kind in KINDS}
    return Stats(storage.figures, by_kind)


async def verify(storage: IStorage) -> tuple[int, list[str]]:
    """
    Re-hash every blob and manifest, and remove those that do not match
    their digest.  Returns how many were checked, and the removed keys.
    """
    checked, removed = 0, []
    for kind in (BLOB, MANIFEST):
        for name in await storage.entries(kind):
            digest = Digest.parse(name)
            matches = await _matches(storage, kind, digest)
            if matches is None:
                continue  # removed meanwhile
            checked += 1
            if not matches:
                await storage.remove(kind, name)
                removed.append(f"{kind}/{name}")
    return checked, removed


async def _matches(storage: IStorage, kind: str, digest: Digest) -> bool | None:
    hasher = digest.hasher()
    if kind == MANIFEST:
        manifest = await storage.get_manifest(digest)
        if manifest is None:
            return None
        hasher.update(manifest.body)
        return hasher.hexdigest() == digest.hex
    blob = await storage.open_blob(digest)
    if blob is None:
        # Gone, or removed for having the wrong size: either way not served.
        return None
    source = blob.source
    try:
        offset = 0
        while offset < blob.size:
            data = source.read(offset, min(_READ_SIZE, blob.size - offset))
            if not data:
                return False
            hasher.update(data)
            offset += len(data)
    except OSError:
        return False
    finally:
        source.release()
    return hasher.hexdigest() == digest.hex


async def gc(storage: IStorage) -> int:
    """Apply the size limit now; return how many entries were evicted."""
    return await storage.evict_to_limit()
