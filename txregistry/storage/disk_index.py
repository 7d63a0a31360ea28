"""
The disk backend's own index: each entry's size, last access and pin, and
the counts of answers behind the hit ratio.

diskcache holds the bytes; eviction needs more than its public API gives:
an order of least recent use that skips pinned entries, and eviction one
entry at a time (diskcache's own C{cull} removes ten at once, which with
blobs of a GiB throws away far more than needed).  This index keeps that in
a SQLite table of its own, beside diskcache's database, so that txregistry
never reaches into diskcache's private tables.

The index follows the store: an entry is added after diskcache has it and
removed before diskcache drops it, so after a crash the index can at worst
name entries that are gone (which a lookup or L{ContentIndex.keep_only}
removes), or miss entries diskcache has (which the backend adopts).
All methods block; the disk backend calls them through its runner.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS content (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    accessed REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS content_by_access ON content (pinned, accessed);
CREATE TABLE IF NOT EXISTS answers (
    source TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""
# An access time is rewritten at most this often, so that a hot tag does
# not cost a database write on every request.
ACCESS_RESOLUTION = 1.0


class ContentIndex:
    """Sizes, access times and pins of the entries in one disk store."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        # One connection, shared by the runner's threads under the lock;
        # SQLite itself keeps other processes (the command line) consistent.
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=60
        )
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, key: str, size: int, now: float, pinned: bool = False) -> None:
        """Record a new or replaced entry; a pin, once set, stays until unpinned."""
        with self._lock:
            self._db.execute(
                "INSERT INTO content (key, size, accessed, pinned) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET size = excluded.size,"
                " accessed = excluded.accessed, pinned = max(pinned, excluded.pinned)",
                (key, size, now, int(pinned)),
            )

    def touch(self, key: str, now: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE content SET accessed = ? WHERE key = ? AND accessed < ?",
                (now, key, now - ACCESS_RESOLUTION),
            )

    def pin(self, key: str, pinned: bool) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE content SET pinned = ? WHERE key = ?", (int(pinned), key)
            )
            return cursor.rowcount > 0

    def remove(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM content WHERE key = ?", (key,))

    def least_recently_used(self) -> str | None:
        """The unpinned entry accessed longest ago."""
        with self._lock:
            row = self._db.execute(
                "SELECT key FROM content WHERE pinned = 0 ORDER BY accessed LIMIT 1"
            ).fetchone()
        return None if row is None else str(row[0])

    def totals(self) -> tuple[int, int, int, int]:
        """Bytes and entries in all, then bytes and entries pinned."""
        with self._lock:
            row = self._db.execute(
                "SELECT coalesce(sum(size), 0), count(*),"
                " coalesce(sum(CASE WHEN pinned THEN size END), 0), coalesce(sum(pinned), 0)"
                " FROM content"
            ).fetchone()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def add_answers(self, hits: int, misses: int) -> None:
        """Add to the counts of answers from the cache and from the upstream."""
        with self._lock:
            self._db.executemany(
                "INSERT INTO answers (source, count) VALUES (?, ?)"
                " ON CONFLICT (source) DO UPDATE SET count = count + excluded.count",
                [("cache", hits), ("upstream", misses)],
            )

    def add_corrupt(self, count: int) -> None:
        """Count entries removed for failing a check, in the answers' table of counts."""
        with self._lock:
            self._db.execute(
                "INSERT INTO answers (source, count) VALUES ('corrupt', ?)"
                " ON CONFLICT (source) DO UPDATE SET count = count + excluded.count",
                (count,),
            )

    def corrupt(self) -> int:
        """Entries removed for failing a check, since the index was created."""
        with self._lock:
            row = self._db.execute("SELECT count FROM answers WHERE source = 'corrupt'").fetchone()
        return int(row[0]) if row else 0

    def answers(self) -> tuple[int, int]:
        """Answers from the cache and from the upstream, since the index was created."""
        with self._lock:
            counts = dict(self._db.execute("SELECT source, count FROM answers").fetchall())
        return int(counts.get("cache", 0)), int(counts.get("upstream", 0))

    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM content WHERE substr(key, 1, ?) = ? ORDER BY key",
                (len(prefix), prefix),
            ).fetchall()
        return [str(key) for (key,) in rows]

    def pinned(self, prefix: str) -> dict[str, float]:
        """The pinned keys starting with C{prefix}, with their access times."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, accessed FROM content WHERE pinned AND substr(key, 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()
        return {str(key): float(accessed) for key, accessed in rows}

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT pinned FROM content WHERE key = ?", (key,)).fetchone()
        return bool(row and row[0])

    def keep_only(self, keys: Iterable[str]) -> int:
        """Forget entries not in C{keys} (what the store really holds); how many."""
        present = set(keys)
        gone = [key for key in self.keys() if key not in present]
        for key in gone:
            self.remove(key)
        return len(gone)

    def known(self, key: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM content WHERE key = ?", (key,)).fetchone()
        return row is not None
