"""
The cache under pressure, with real parts: a crowd of skopeo and HTTP
clients on one cold image, a kill -9 in the middle of a download, a disk
that fills up, and malformed requests, none of which may cost a correct
pull.
"""

import hashlib
import itertools
import json
import resource
import signal
import socket
import urllib.request

import pytest
import pytest_twisted
import treq
from harness.faults import Fault
from harness.registry import hub
from harness.skopeo import check_pulled
from harness.twistd import start, start_in_front_of
from twisted.internet.defer import Deferred, DeferredList

pytestmark = pytest.mark.integration


def layers_of(upstream, name):
    """The blob digests of a pushed single-platform image."""
    image = upstream.images[name]
    request = urllib.request.Request(
        f"{upstream.url}/v2/{image.repository}/manifests/{image.digest}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request) as response:
        manifest = json.load(response)
    return [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]


@pytest_twisted.ensureDeferred
async def test_a_crowd_on_one_cold_image_makes_one_upstream_get_per_blob(
    upstream, start_txregistry, skopeo, tmp_path
):
    tx = start_txregistry(hub(upstream.url))
    image = upstream.images["big"]
    blobs = layers_of(upstream, "big")
    mark = upstream.registry.mark()

    pulls = [
        Deferred.fromCoroutine(skopeo.pull(f"{tx.host}/library/big:v1", tmp_path / f"pull{i}"))
        for i in range(4)
    ]

    async def fetch(digest):
        response = await treq.get(f"{tx.url}/v2/library/big/blobs/{digest}")
        return response.code, await response.content()

    gets = [Deferred.fromCoroutine(fetch(blobs[-1])) for _ in range(8)]
    results = await DeferredList(pulls + gets, fireOnOneErrback=True, consumeErrors=True)
    for i in range(4):
        check_pulled(tmp_path / f"pull{i}", image.digest)
    for _, (code, body) in results[4:]:
        assert code == 200 and len(body) >= 64 << 20

    downloaded = upstream.registry.blob_gets(mark)
    assert sorted(downloaded) == sorted(blobs), "each blob was downloaded exactly once"


@pytest_twisted.ensureDeferred
async def test_kill_9_in_the_middle_of_a_download(tmp_path, upstream, blob, proxy):
    digest, data = blob
    fault = proxy.inject(Fault(f"/blobs/{digest}", "stall", at=1_500_000))
    process, config, port = start_in_front_of(tmp_path, proxy.url)
    url = f"http://127.0.0.1:{port}/v2/library/faults/blobs/{digest}"
    download = treq.get(url, unbuffered=True)
    download.addErrback(lambda _: None)
    await fault.stalled
    process.wait_for(f"fetching blob library/faults@{digest}")
    partial = list((tmp_path / "cache" / "tmp").iterdir())
    assert len(partial) == 1, "the download was in progress"

    process.signal(signal.SIGKILL)
    assert process.wait_exit() == -signal.SIGKILL
    restarted, _, port = start(tmp_path, config)
    try:
        restarted.wait_for("checked the cache after an unclean stop")
        assert list((tmp_path / "cache" / "tmp").iterdir()) == []
        url = f"http://127.0.0.1:{port}/v2/library/faults/blobs/{digest}"
        first = await treq.get(url)
        assert (first.code, first.headers.getRawHeaders("x-cache")) == (200, ["MISS"])
        assert await first.content() == data
        second = await treq.get(url)
        assert second.headers.getRawHeaders("x-cache") == ["HIT"]
        assert await second.content() == data
    finally:
        restarted.stop()


def small_files_only(limit):
    """For the child: a disk that takes no file larger than C{limit} bytes."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


def get_blob(port, digest):
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/v2/library/big/blobs/{digest}"
    ) as response:
        return response.headers["X-Cache"], "sha256:" + hashlib.sha256(response.read()).hexdigest()


def test_full_disk_still_serves_every_pull(tmp_path, upstream, skopeo):
    # No file may grow past 8 MiB: the 64 MiB layer cannot be cached, the
    # small blobs can.
    process, _, port = start_in_front_of(tmp_path, upstream.url, preexec=small_files_only(8 << 20))
    try:
        config, *_, big = layers_of(upstream, "big")
        assert get_blob(port, big) == ("MISS", big)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as response:
            health = json.load(response)
        assert (health["status"], health["cache"]["status"]) == ("degraded", "degraded")
        assert get_blob(port, big) == ("MISS", big)  # still served, never cached

        image = upstream.images["big"]
        skopeo.pull_now(f"127.0.0.1:{port}/library/big:v1", tmp_path / "pulled")
        check_pulled(tmp_path / "pulled", image.digest)
        assert get_blob(port, config) == ("HIT", config)
    finally:
        process.stop()
    changes = [
        "degraded" if "cache degraded" in line else "healthy"
        for line in process.lines
        if "cache degraded" in line or "cache healthy again" in line
    ]
    assert changes[0] == "degraded"
    assert all(a != b for a, b in itertools.pairwise(changes)), f"one line per change: {changes}"


def raw_request(port, data):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.settimeout(60)  # a hang guard, not a measurement
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def test_malformed_requests_do_not_disturb_a_pull(tmp_path, upstream, skopeo):
    process, _, port = start_in_front_of(tmp_path, upstream.url, server='header_timeout = "1s"')
    try:
        trickler = socket.create_connection(("127.0.0.1", port))
        trickler.settimeout(60)
        trickler.sendall(b"GET /v2/ HTTP/1.1\r\nHo")
        oversized = raw_request(port, b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        garbage = raw_request(port, b"\x00\x01 not http at all\r\n\r\n")
        image = upstream.images["small"]
        skopeo.pull_now(f"127.0.0.1:{port}/library/small:v1", tmp_path / "pulled")
        check_pulled(tmp_path / "pulled", image.digest)
        assert oversized.startswith(b"HTTP/1.1 431 ")
        assert garbage.startswith(b"HTTP/1.1 400 ")
        answer = b""
        while chunk := trickler.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
        trickler.close()
    finally:
        process.stop()
    assert not any("Traceback" in line for line in process.lines)
