"""
With C{backend = "s3"}, memory stays flat whatever the blob's size: a cold
fill streams into a multipart upload one part at a time, read back from the
local file, and a node with an empty local tier streams the blob from the
bucket through its disk, pausing the bucket when the disk falls behind.
"""

import os
import signal

import pytest
from harness.swift import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, botocore_client
from harness.twistd import start, write_config
from test_memory import BLOB_SIZE, blob_chunks, fetch, peak_rss

from txregistry.repository.fill import FillPolicy
from txregistry.storage.s3 import object_key

pytestmark = pytest.mark.integration

# The fill's window, and chunks on their way to the bucket and to the
# client: not the blob, and not a whole part (parts stream from the file;
# holding each in memory grew the filler by 49 MiB).
ALLOWED_GROWTH = FillPolicy().relay_window + (12 << 20)


def s3_node(directory, upstream_url, swift, prefix):
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for name, value in (("access", ACCESS_KEY), ("secret", SECRET_KEY)):
        path = directory / f"s3-{name}-key"
        path.write_text(value)
        os.chmod(path, 0o600)
        keys.append(path)
    config = write_config(
        directory,
        f"""
        [server]
        listen = ["tcp:0:interface=127.0.0.1"]
        admin_listen = []
        [cache]
        directory = "{directory / "cache"}"
        [storage]
        backend = "s3"
        [storage.s3]
        endpoint = "{swift.endpoint}"
        bucket = "{BUCKET}"
        prefix = "{prefix}"
        region = "{REGION}"
        access_key_file = "{keys[0]}"
        secret_key_file = "{keys[1]}"
        [[registry]]
        name = "docker.io"
        mirrors = ["{upstream_url}"]
        """,
    )
    return start(directory, config)


def test_memory_stays_flat_into_and_out_of_the_bucket(tmp_path, upstream, swift):
    digest = upstream.registry.upload_blob("library/large", blob_chunks)
    small = upstream.registry.upload_blob("library/large", lambda: iter([b"warm-up"]))
    prefix = f"memory-{os.urandom(6).hex()}/"
    s3 = botocore_client(swift.endpoint)
    key = object_key(prefix, "blob", digest)
    growth = {}
    for role in ("filler", "reader"):
        process, _, port = s3_node(tmp_path / role, upstream.url, swift, prefix)
        try:
            pid = process.popen.pid
            for _ in range(2):
                assert fetch(port, f"/v2/library/large/blobs/{small}")[0] == small
            baseline = peak_rss(pid)
            expected = "MISS" if role == "filler" else "HIT"
            path = f"/v2/library/large/blobs/{digest}"
            assert fetch(port, path) == (digest, BLOB_SIZE, expected)
            if role == "filler":
                # The upload completes after the response; it says so.
                process.wait_for(f"stored {digest} in the bucket")
                listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("Contents", [])
                assert [item["Size"] for item in listed] == [BLOB_SIZE]
            growth[role] = peak_rss(pid) - baseline
        finally:
            process.signal(signal.SIGTERM)
            process.wait_exit()
    print(f"growth while streaming, KiB: { {k: v >> 10 for k, v in growth.items()} }")
    for role, grown in growth.items():
        assert grown < ALLOWED_GROWTH, f"{role}: +{grown >> 20} MiB"
