"""
What skopeo prints when the upstream fails: the reason, not just
"502 Bad Gateway".  containers/image, like every Go registry client,
prints a 5xx's status line and ignores its body, so txregistry sends the
reason in the status line too (see README, "What each client prints").
"""

import socket
import subprocess

import pytest
import pytest_twisted
from harness.faults import Fault
from harness.registry import hub
from harness.skopeo import skopeo_binary

from txregistry.config import UpstreamConfig

pytestmark = pytest.mark.integration


async def skopeo_error(skopeo, reference, destination):
    with pytest.raises(AssertionError) as failed:
        await skopeo.pull(reference, destination)
    return str(failed.value)


@pytest_twisted.ensureDeferred
async def test_skopeo_shows_which_mirror_is_down(start_txregistry, skopeo, tmp_path):
    # A bound port that does not listen refuses every connection.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        mirror = f"http://127.0.0.1:{port}"
        tx = start_txregistry(hub(mirror))
        error = await skopeo_error(skopeo, f"{tx.host}/library/small:v1", tmp_path / "a")
    assert (
        f"received unexpected HTTP status: 502 upstream registry docker.io is unavailable:"
        f" {mirror}: cannot connect to 127.0.0.1:{port}: 127.0.0.1: connection refused"
    ) in error
    assert "txregistry doctor" in error


@pytest_twisted.ensureDeferred
async def test_skopeo_shows_a_mirror_that_drops_the_connection(
    proxy, start_txregistry, skopeo, tmp_path
):
    proxy.inject(Fault("/manifests/v1", "reset", times=10))
    tx = start_txregistry(hub(proxy.url))
    error = await skopeo_error(skopeo, f"{tx.host}/library/small:v1", tmp_path / "a")
    assert f"502 upstream registry docker.io is unavailable: {proxy.url}: " in error
    assert "502 Bad Gateway" not in error
    reason = error.split(f"{proxy.url}: ", 1)[1]
    assert "connection" in reason.lower(), reason


@pytest_twisted.ensureDeferred
async def test_skopeo_shows_a_mirror_that_never_answers(proxy, start_txregistry, skopeo, tmp_path):
    proxy.inject(Fault("/manifests/v1", "hang", times=10))
    tx = start_txregistry(hub(proxy.url, upstream=UpstreamConfig(response_timeout=1.0)))
    error = await skopeo_error(skopeo, f"{tx.host}/library/small:v1", tmp_path / "a")
    assert (
        f"502 upstream registry docker.io is unavailable: {proxy.url}: no response within 1s"
    ) in error


def containers_image_prints_blob_status_lines() -> bool:
    """
    Whether this skopeo reads a failed blob answer as it reads a manifest
    answer: containers/image 5.25 (skopeo 1.12, podman 4.5) and later do;
    before, it printed the status code and Go's standard text only.
    """
    version = subprocess.run(
        [skopeo_binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    return tuple(int(part) for part in version.split(".")[:2]) >= (1, 12)


@pytest_twisted.ensureDeferred
async def test_skopeo_shows_why_a_blob_could_not_be_fetched(
    proxy, upstream, start_txregistry, skopeo, tmp_path, logs
):
    image = upstream.images["small"]
    tx = start_txregistry(hub(proxy.url))
    # The manifest comes through; every blob request is dropped.
    proxy.inject(Fault("/blobs/", "reset", times=100))
    error = await skopeo_error(skopeo, f"{tx.host}/library/small@{image.digest}", tmp_path / "a")
    if containers_image_prints_blob_status_lines():
        assert f"502 upstream registry docker.io is unavailable: {proxy.url}: " in error
    else:
        # Nothing of the answer but its status reaches this skopeo's user:
        # the reason is in txregistry's log.
        assert "invalid status code from registry 502 (Bad Gateway)" in error
        assert logs.matching("All mirrors failed for docker.io blob library/small@sha256:")
