"""The disk backend's own promises: moves not copies, size checks, crash repair."""

from __future__ import annotations

import os
from pathlib import Path

from test_contract import fired as result
from test_contract import read_all_now as read_all
from test_contract import store_blob_now as store_blob
from twisted.internet.defer import Deferred

from txregistry.oci.reference import Digest
from txregistry.storage import upkeep
from txregistry.storage.disk import DiskStorage
from txregistry.storage.interface import StoredManifest
from txregistry.storage.runner import run_inline


def started(directory: Path, size_limit: int = 1 << 30) -> DiskStorage:
    storage = DiskStorage(directory, size_limit, run_inline)
    storage.start()
    return storage


def stored_file(storage: DiskStorage) -> Path:
    (path,) = (storage.directory / "store").rglob("*.val")
    return path


def test_a_committed_blob_is_moved_not_copied(tmp_path):
    storage = started(tmp_path)
    data = os.urandom(100_000)
    digest = Digest.of(data)
    staged = storage.stage_blob(digest)
    staged.append(data)
    inode = os.stat(staged.path).st_ino
    result(staged.seal())
    assert result(staged.commit(digest, len(data))) is True
    assert not os.path.exists(staged.path)
    assert staged.read(0, 10) == data[:10], "still readable through the open file"
    staged.close()
    assert os.stat(stored_file(storage)).st_ino == inode
    storage.stop()


def test_a_file_of_the_wrong_size_is_a_miss_and_is_removed(tmp_path):
    storage = started(tmp_path)
    digest = store_blob(storage, b"x" * 5000)
    path = stored_file(storage)
    with open(path, "r+b") as f:
        f.truncate(4000)
    assert result(storage.open_blob(digest)) is None
    assert not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 5000)
    assert result(storage.open_blob(digest)) is None, "the entry itself is gone"
    assert result(storage.entries("blob")) == []


def test_a_missing_file_is_a_miss(tmp_path):
    storage = started(tmp_path)
    digest = store_blob(storage, b"y" * 100)
    stored_file(storage).unlink()
    assert result(storage.open_blob(digest)) is None


def test_leftover_downloads_are_removed_at_start(tmp_path):
    storage = started(tmp_path)
    staged = storage.stage_blob(Digest.of(b"interrupted"))
    staged.append(b"half")
    storage.stop()
    started(tmp_path).stop()
    assert not os.path.exists(staged.path)


def test_an_unusable_directory_leaves_the_storage_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    storage = started(blocker / "cache")
    assert storage.status == "unavailable"
    assert "cannot open the cache" in storage.problem and str(blocker) in storage.problem
    assert result(storage.open_blob(Digest.of(b"x"))) is None
    assert result(storage.get_manifest(Digest.of(b"x"))) is None
    assert result(storage.put_manifest(Digest.of(b"x"), StoredManifest("t", b"x"))) is False
    assert storage.can_stage(10) is False


def test_a_crash_is_repaired_at_the_next_start(tmp_path, logs):
    storage = started(tmp_path)
    data = b"kept" * 10_000
    digest = store_blob(storage, data)
    # A crash between a blob's file being moved in and its entry written:
    orphan = tmp_path / "store" / "ab" / "cd" / "orphan.val"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half a blob")
    leftover = storage.tmp_directory / "sha256-0000.partial"
    leftover.write_bytes(b"an interrupted download")
    # ... and no stop().

    again = started(tmp_path)
    assert again.crashed and not leftover.exists() and not orphan.exists()
    assert read_all(again, digest) == data
    assert logs.matching("checked the cache after an unclean stop: 1 problems fixed")


def test_a_lost_index_is_rebuilt_from_the_store(tmp_path):
    storage = started(tmp_path, size_limit=250_000)
    blobs = [store_blob(storage, os.urandom(100_000)) for _ in range(2)]
    storage.stop()
    (tmp_path / "index.sqlite").unlink()
    again = started(tmp_path, size_limit=250_000)
    result(again.update_figures())
    assert (again.figures.entries, again.figures.size) == (2, 200_000)
    store_blob(again, os.urandom(100_000))
    assert sum(read_all(again, d) is not None for d in blobs) == 1, "the limit still holds"


def test_verify_removes_a_blob_that_rotted_on_disk(tmp_path):
    storage = started(tmp_path)
    digest = store_blob(storage, b"z" * 5000)
    path = stored_file(storage)
    path.write_bytes(b"Z" * 5000)
    checked, removed = result(Deferred.fromCoroutine(upkeep.verify(storage)))
    assert (checked, removed) == (1, [f"blob/{digest}"])
    assert result(storage.open_blob(digest)) is None
