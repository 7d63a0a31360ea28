"""
The pull API against the distribution spec: every pull endpoint, walked
through txregistry in front of a real distribution registry, with the
statuses and headers the spec (opencontainers/distribution-spec spec.md)
and its conformance suite require, and the same statuses distribution
itself answers, except where the README says txregistry differs.
"""

import hashlib
import json
import os
from dataclasses import dataclass

import pytest
import pytest_twisted
import treq
from harness.registry import hub
from twisted.web.http_headers import Headers

pytestmark = pytest.mark.integration

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# What the conformance suite sends with every manifest request.
ACCEPT = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST}"}
# The codes a JSON body of a 4xx may carry (spec, "Error Codes").
SPEC_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
}


@dataclass
class Answer:
    status: int
    headers: Headers
    body: bytes
    # Twisted's client keeps a GET's Content-Length apart from the headers.
    length: int | None

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        if not values and name == "Content-Length" and self.length is not None:
            return str(self.length)
        return values[0] if values else None

    @property
    def code(self) -> str:
        return json.loads(self.body)["errors"][0]["code"]


async def ask(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> Answer:
    response = await treq.request(
        method, base + path, headers={k: [v] for k, v in (headers or {}).items()}
    )
    body = await treq.content(response)
    length = response.length if isinstance(response.length, int) else None
    return Answer(response.code, response.headers, body, length)


class Walk:
    """The same requests to txregistry and to its upstream, side by side."""

    def __init__(self, tx: str, upstream: str) -> None:
        self.tx = tx
        self.upstream = upstream

    async def both(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[Answer, Answer]:
        ours = await ask(self.tx, method, path, headers)
        theirs = await ask(self.upstream, method, path, headers)
        assert b"Traceback" not in ours.body
        if ours.status >= 400 and method == "GET" and ours.status != 416:
            assert ours.header("Content-Type") == "application/json"
            assert ours.code in SPEC_CODES, ours.body
        if method == "HEAD":
            assert ours.body == b""
        return ours, theirs

    async def same_status(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> Answer:
        ours, theirs = await self.both(method, path, headers)
        assert ours.status == theirs.status, (method, path, ours, theirs)
        return ours


def random_digest() -> str:
    return "sha256:" + hashlib.sha256(os.urandom(32)).hexdigest()


@pytest_twisted.ensureDeferred
async def test_the_pull_api_answers_as_the_spec_says(upstream, start_txregistry, logs):
    tx = start_txregistry(hub(upstream.url))
    walk = Walk(tx.url, upstream.url)

    # end-1: GET /v2/.
    for method in ("GET", "HEAD"):
        base = await walk.same_status(method, "/v2/")
        assert base.status == 200
        assert base.header("Docker-Distribution-API-Version") == "registry/2.0"

    # end-3: manifests, by tag and by digest, GET and HEAD, of each kind.
    for name, media_type in (
        ("small", OCI_MANIFEST),
        ("docker", DOCKER_MANIFEST),
        ("multi", OCI_INDEX),
    ):
        image = upstream.images[name]
        for reference in (image.tag, image.digest):
            path = f"/v2/{image.repository}/manifests/{reference}"
            got, direct = await walk.both("GET", path, ACCEPT)
            assert got.status == direct.status == 200
            assert got.body == direct.body
            assert f"sha256:{hashlib.sha256(got.body).hexdigest()}" == image.digest
            assert got.header("Docker-Content-Digest") == image.digest
            assert got.header("Content-Type") == media_type
            assert got.header("Content-Length") == str(len(got.body))
            head = await walk.same_status("HEAD", path, ACCEPT)
            assert head.status == 200
            assert head.header("Docker-Content-Digest") == image.digest
            assert head.header("Content-Type") == media_type
            assert head.header("Content-Length") == str(len(got.body))

    small = upstream.images["small"]
    repository = small.repository
    for missing in ("missing-tag", random_digest()):
        for method in ("GET", "HEAD"):
            answer = await walk.same_status(method, f"/v2/{repository}/manifests/{missing}", ACCEPT)
            assert answer.status == 404
            if method == "GET":
                assert answer.code == "MANIFEST_UNKNOWN"

    # A reference that is neither a tag nor a digest: 404, as distribution
    # says, and no request upstream.
    invalid_path = f"/v2/{repository}/manifests/.INVALID_MANIFEST_NAME"
    mark = upstream.registry.mark()
    got = await ask(tx.url, "GET", invalid_path, ACCEPT)
    head = await ask(tx.url, "HEAD", invalid_path, ACCEPT)
    assert not [a for a in upstream.registry.accesses(mark) if "INVALID" in a.path]
    assert (got.status, got.code) == (404, "MANIFEST_UNKNOWN")
    assert "neither a tag nor a digest" in json.loads(got.body)["errors"][0]["message"]
    assert head.status == 404 and head.body == b""
    assert head.header("Content-Length") == got.header("Content-Length") == str(len(got.body))
    for method in ("GET", "HEAD"):
        assert (await walk.same_status(method, invalid_path, ACCEPT)).status == 404

    # A bad digest: 400 DIGEST_INVALID (the conformance suite accepts 400
    # or 404; distribution 2.8 takes it for a tag and answers 500).
    for kind in ("manifests", "blobs"):
        ours, _ = await walk.both("GET", f"/v2/{repository}/{kind}/sha256:baddigeststring")
        assert (ours.status, ours.code) == (400, "DIGEST_INVALID")
    # A bad name: 400 NAME_INVALID, where distribution looks it up and
    # finds nothing.
    ours, theirs = await walk.both("GET", "/v2/Library/small/manifests/v1", ACCEPT)
    assert (ours.status, ours.code) == (400, "NAME_INVALID")
    assert (theirs.status, theirs.code) == (404, "MANIFEST_UNKNOWN")

    # end-2: blobs.
    manifest = json.loads((await ask(tx.url, "GET", f"/v2/{repository}/manifests/v1", ACCEPT)).body)
    layers = sorted(manifest["layers"], key=lambda layer: layer["size"])
    for descriptor in [manifest["config"], *layers]:
        path = f"/v2/{repository}/blobs/{descriptor['digest']}"
        got, direct = await walk.both("GET", path)
        assert got.status == direct.status == 200
        assert got.body == direct.body
        assert f"sha256:{hashlib.sha256(got.body).hexdigest()}" == descriptor["digest"]
        assert got.header("Docker-Content-Digest") == descriptor["digest"]
        assert got.header("Content-Length") == str(descriptor["size"])
        head = await walk.same_status("HEAD", path)
        assert head.status == 200
        assert head.header("Docker-Content-Digest") == descriptor["digest"]
        assert head.header("Content-Length") == str(descriptor["size"])
    for method in ("GET", "HEAD"):
        unknown = await walk.same_status(method, f"/v2/{repository}/blobs/{random_digest()}")
        assert unknown.status == 404
        if method == "GET":
            assert unknown.code == "BLOB_UNKNOWN"

    # Ranges, as the conformance suite asks for them, on the largest layer.
    largest = layers[-1]
    size = largest["size"]
    assert size > 2048
    path = f"/v2/{repository}/blobs/{largest['digest']}"
    whole = (await ask(upstream.url, "GET", path)).body
    for header, status, part in (
        ("bytes=500-1499", 206, (500, 1500)),
        ("bytes=500-", 206, (500, size)),
        ("bytes=-500", 206, (size - 500, size)),
        (f"bytes={size - 48}-{size + 2952}", 206, (size - 48, size)),
        ("bytes=500-0", 416, None),
        (f"bytes={size}-{size + 5000}", 416, None),
    ):
        if part is None:
            # Not compared: distribution 2.8 announces the whole blob's
            # Content-Length on its 416 and sends a short text.
            answer = await ask(tx.url, "GET", path, {"Range": header})
            assert answer.status == status, header
            assert answer.header("Content-Range") == f"bytes */{size}"
            assert answer.header("Content-Length") == str(len(answer.body))
            continue
        answer = await walk.same_status("GET", path, {"Range": header})
        assert answer.status == status, header
        start, end = part
        assert answer.body == whole[start:end]
        assert answer.header("Content-Length") == str(end - start)
        assert answer.header("Content-Range") == f"bytes {start}-{end - 1}/{size}"

    # end-8: tags/list, passed through.
    tags = await walk.same_status("GET", f"/v2/{repository}/tags/list")
    assert tags.status == 200
    assert json.loads(tags.body) == {"name": repository, "tags": ["v1"]}
    assert (await walk.same_status("GET", "/v2/library/nothing/tags/list")).status == 404

    # end-12: referrers, passed through: this distribution has no referrers
    # API, and its 404 tells clients to fall back to the referrers tag.
    referrers = await walk.same_status("GET", f"/v2/{repository}/referrers/{small.digest}")
    assert referrers.status == 404

    # A registry scoped by ns says so (spec, "Registry Proxying").
    scoped = await ask(tx.url, "HEAD", f"/v2/{repository}/manifests/v1?ns=docker.io", ACCEPT)
    assert scoped.status == 200 and scoped.header("OCI-Namespace") == "docker.io"
    assert (await ask(tx.url, "HEAD", "/v2/", ACCEPT)).header("OCI-Namespace") is None

    # Pushes and deletes to a pull-through registry: 403 DENIED, which
    # Docker does not retry as it retries a 405.
    for method, path in (
        ("PUT", f"/v2/{repository}/manifests/v2"),
        ("DELETE", f"/v2/{repository}/manifests/{small.digest}"),
        ("DELETE", f"/v2/{repository}/blobs/{largest['digest']}"),
        ("POST", f"/v2/{repository}/blobs/uploads/"),
        ("PATCH", f"/v2/{repository}/blobs/uploads/1234"),
    ):
        refused = await ask(tx.url, method, path)
        assert (refused.status, refused.code) == (403, "DENIED")

    # Paths outside the API: 404, with a code from the spec's list.
    other = await ask(tx.url, "GET", f"/v2/{repository}/nothing/v1")
    assert (other.status, other.code) == (404, "UNSUPPORTED")

    # No answer to HEAD had a body for Twisted to eat.
    assert not logs.matching("I think I'll eat it")
