"""The disk store: verified blobs moved in, checked on the way out."""

import os

import pytest
from harness.memory import run_now

from txregistry.oci.reference import Digest
from txregistry.storage.disk import CachedManifest, CacheStore, TagEntry


def result(d):
    results = []
    d.addBoth(results.append)
    (value,) = results
    return value


@pytest.fixture
def store(tmp_path):
    store = CacheStore(tmp_path / "cache", 1 << 30, run_now)
    store.open()
    yield store
    store.close()


def commit(store, data):
    digest = Digest.of(data)
    fd, path = store.new_temp_file(digest)
    os.write(fd, data)
    os.close(fd)
    result(store.commit_blob(digest, path, len(data)))
    return digest, path


def test_committed_blob_is_moved_not_copied(store):
    data = os.urandom(100_000)
    digest = Digest.of(data)
    fd, path = store.new_temp_file(digest)
    os.write(fd, data)
    inode = os.fstat(fd).st_ino
    os.close(fd)
    result(store.commit_blob(digest, path, len(data)))
    assert not os.path.exists(path)
    blob = result(store.open_blob(digest))
    assert (blob.size, blob.file.read()) == (len(data), data)
    assert os.fstat(blob.file.fileno()).st_ino == inode
    blob.file.close()


def test_missing_blob_is_none(store):
    assert result(store.open_blob(Digest.of(b"nothing"))) is None


def test_file_of_the_wrong_size_is_a_miss_and_is_removed(store):
    digest, _ = commit(store, b"x" * 5000)
    blob = result(store.open_blob(digest))
    path = blob.file.name
    blob.file.close()
    with open(path, "r+b") as f:
        f.truncate(4000)
    assert result(store.open_blob(digest)) is None
    assert not os.path.exists(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * 5000)
    assert result(store.open_blob(digest)) is None, "the entry itself is gone"


def test_missing_file_is_a_miss(store):
    digest, _ = commit(store, b"y" * 100)
    blob = result(store.open_blob(digest))
    os.unlink(blob.file.name)
    blob.file.close()
    assert result(store.open_blob(digest)) is None


def test_manifests_and_tags(store):
    body = b'{"schemaVersion": 2}'
    digest = Digest.of(body)
    result(store.put_manifest(digest, CachedManifest("application/x.test", body)))
    assert result(store.get_manifest(digest)) == CachedManifest("application/x.test", body)
    entry = TagEntry(str(digest), "application/x.test", len(body), 1234.5)
    result(store.put_tag("docker.io/library/a:1#x", entry))
    assert result(store.get_tag("docker.io/library/a:1#x")) == entry
    assert result(store.get_tag("docker.io/library/a:2#x")) is None


def test_everything_survives_a_reopen(tmp_path):
    store = CacheStore(tmp_path, 1 << 30, run_now)
    store.open()
    digest, _ = commit(store, b"persistent")
    result(store.put_manifest(digest, CachedManifest("t", b"m")))
    store.close()
    again = CacheStore(tmp_path, 1 << 30, run_now)
    again.open()
    blob = result(again.open_blob(digest))
    assert blob.file.read() == b"persistent"
    blob.file.close()
    assert result(again.get_manifest(digest)).body == b"m"
    again.close()


def test_leftover_downloads_are_removed_at_open(tmp_path):
    store = CacheStore(tmp_path, 1 << 30, run_now)
    store.open()
    fd, path = store.new_temp_file(Digest.of(b"interrupted"))
    os.write(fd, b"half")
    os.close(fd)
    store.close()
    CacheStore(tmp_path, 1 << 30, run_now).open()
    assert not os.path.exists(path)


def test_unusable_directory_leaves_the_store_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = CacheStore(blocker / "cache", 1 << 30, run_now)
    store.open()
    assert not store.available
    assert "cannot open the cache" in store.problem and str(blocker) in store.problem
    assert result(store.open_blob(Digest.of(b"x"))) is None
    assert result(store.get_manifest(Digest.of(b"x"))) is None
    assert result(store.put_manifest(Digest.of(b"x"), CachedManifest("t", b"x"))) is None
