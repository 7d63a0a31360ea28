"""
Pushes to a hosted registry, in memory: every upload style, the 416 cases,
expiry with a Clock, the manifest checks, deletes, referrers, and who may
push.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

import bcrypt
import pytest
from harness.memory import Client, MemoryRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from txregistry.config import MirrorConfig, PushUsers, RegistryConfig, Secret, ServerConfig
from txregistry.repository import hosted_gc

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"

HUB = RegistryConfig("docker.io", (MirrorConfig("https://registry-1.docker.io"),), default=True)
LOCAL = RegistryConfig("local", (), hosted=True)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def registry(tmp_path):
    return MemoryRegistry(tmp_path, registries=[HUB, LOCAL])


def tcp_like_client(registry: MemoryRegistry) -> Client:
    """
    A client whose transport, like a TCP one, ignores a resume once it is
    closing (StringTransport raises by default): Twisted's channel resumes
    its transport when a request ends, also on a connection it closes.
    """
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    transport._lenient = True
    return registry.client(transport)


def staged_files(registry: MemoryRegistry) -> list[str]:
    return sorted(p.name for p in registry.storage.tmp_directory.iterdir())


def post(client: Client, repository: str = "app", query: str = "") -> str:
    """Start an upload; its relative Location."""
    response = client.request("POST", f"/v2/local/{repository}/blobs/uploads/{query}")
    assert response.status == 202, response.body
    assert response.headers["location"].startswith(f"/v2/local/{repository}/blobs/uploads/")
    assert response.headers["range"] == "0-0"
    assert response.headers["docker-upload-uuid"] in response.headers["location"]
    return response.headers["location"]


def push_blob(registry: MemoryRegistry, data: bytes, repository: str = "app") -> str:
    digest = digest_of(data)
    response = registry.client().request(
        "POST", f"/v2/local/{repository}/blobs/uploads/?digest={digest}", data
    )
    assert response.status == 201, response.body
    return digest


def image_manifest(config: str, layers: list[tuple[str, int]], **extra) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_TYPE, "digest": config, "size": 2},
        "layers": [{"mediaType": LAYER_TYPE, "digest": d, "size": s} for d, s in layers],
        **extra,
    }
    return json.dumps(document).encode()


def push_image(registry: MemoryRegistry, tag: str = "1", repository: str = "app", **extra):
    layer = os.urandom(3000)
    config = push_blob(registry, b"{}", repository)
    layer_digest = push_blob(registry, layer, repository)
    body = image_manifest(config, [(layer_digest, len(layer))], **extra)
    response = registry.client().request(
        "PUT", f"/v2/local/{repository}/manifests/{tag}", body, {"Content-Type": OCI_MANIFEST}
    )
    return response, body, layer


class TestUploadStyles:
    def test_a_single_post_with_the_digest(self, registry):
        data = os.urandom(10_000)
        digest = digest_of(data)
        response = registry.client().request(
            "POST", f"/v2/local/app/blobs/uploads/?digest={digest}", data
        )
        assert response.status == 201
        assert response.headers["location"] == f"/v2/local/app/blobs/{digest}"
        assert response.headers["docker-content-digest"] == digest
        pulled = registry.get(f"/v2/local/app/blobs/{digest}")
        assert (pulled.status, pulled.body) == (200, data)
        assert registry.head(f"/v2/local/app/blobs/{digest}").headers["content-length"] == "10000"
        assert staged_files(registry) == []

    def test_post_then_put_with_the_whole_body(self, registry):
        # containerd, BuildKit, Docker 29.
        data = os.urandom(70_000)
        client = registry.client()
        location = post(client)
        response = client.request("PUT", f"{location}?digest={digest_of(data)}", data)
        assert response.status == 201
        assert response.headers["docker-content-digest"] == digest_of(data)
        assert registry.get(f"/v2/local/app/blobs/{digest_of(data)}").body == data

    def test_one_chunked_patch_then_an_empty_put(self, registry):
        # Docker before 29: a PATCH in chunked transfer encoding.
        data = os.urandom(50_000)
        client = registry.client()
        location = post(client)
        client.clear()
        client.send("PATCH", location, {"Transfer-Encoding": "chunked"})
        for start in range(0, len(data), 16_384):
            piece = data[start : start + 16_384]
            client.send_body(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert client.transport.value() == b""  # no answer before the body ends
        client.send_body(b"0\r\n\r\n")
        patched = client.response()
        assert patched.status == 202
        assert patched.headers["range"] == f"0-{len(data) - 1}"
        response = client.request("PUT", f"{location}?digest={digest_of(data)}")
        assert response.status == 201
        assert registry.get(f"/v2/local/app/blobs/{digest_of(data)}").body == data

    def test_patch_with_content_length_then_put(self, registry):
        # skopeo and podman.
        data = os.urandom(5000)
        client = registry.client()
        location = post(client)
        assert client.request("PATCH", location, data).headers["range"] == "0-4999"
        assert client.request("PUT", f"{location}?digest={digest_of(data)}").status == 201

    def test_chunks_with_content_range_and_status(self, registry):
        data = os.urandom(30_000)
        client = registry.client()
        location = post(client)
        for start in range(0, len(data), 10_000):
            chunk = data[start : start + 10_000]
            headers = {"Content-Range": f"{start}-{start + len(chunk) - 1}"}
            response = client.request("PATCH", location, chunk, headers)
            assert response.status == 202
            assert response.headers["range"] == f"0-{start + len(chunk) - 1}"
            status = client.request("GET", location)
            assert status.status == 204
            assert status.headers["range"] == f"0-{start + len(chunk) - 1}"
            assert status.headers["location"] == location
        assert client.request("PUT", f"{location}?digest={digest_of(data)}").status == 201
        assert registry.get(f"/v2/local/app/blobs/{digest_of(data)}").body == data

    @pytest.mark.parametrize("content_range", ["0-99", "200-299", "150-249"])
    def test_a_chunk_out_of_order_is_416_with_the_range_to_resume_from(
        self, registry, content_range
    ):
        client = registry.client()
        location = post(client)
        client.request("PATCH", location, b"x" * 100, {"Content-Range": "0-99"})
        response = client.request("PATCH", location, b"y" * 100, {"Content-Range": content_range})
        assert response.status == 416
        assert response.headers["range"] == "0-99"
        assert response.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
        # The upload is still there, unchanged, and the right chunk goes on.
        client = registry.client()
        assert client.request("GET", location).headers["range"] == "0-99"
        response = client.request("PATCH", location, b"z" * 100, {"Content-Range": "100-199"})
        assert response.headers["range"] == "0-199"

    def test_a_content_range_that_disagrees_with_the_length_is_refused(self, registry):
        client = registry.client()
        location = post(client)
        response = client.request("PATCH", location, b"x" * 10, {"Content-Range": "0-99"})
        assert response.status == 400
        assert "Content-Length" in response.json()["errors"][0]["message"]

    def test_a_chunked_body_longer_than_its_content_range_is_refused(self, registry):
        client = registry.client()
        location = post(client)
        client.clear()
        client.send("PATCH", location, {"Transfer-Encoding": "chunked", "Content-Range": "0-99"})
        client.send_body(b"%x\r\n%s\r\n" % (60, b"x" * 60))
        client.send_body(b"%x\r\n%s\r\n" % (60, b"y" * 60))
        response = client.response()
        assert response.status == 400
        assert response.headers["range"] == "0-59"
        assert "longer than its Content-Range" in response.json()["errors"][0]["message"]
        # Nothing past the range was kept: the upload goes on from byte 60.
        client = registry.client()
        assert client.request("GET", location).headers["range"] == "0-59"
        rest = b"z" * 40
        response = client.request("PATCH", location, rest, {"Content-Range": "60-99"})
        assert response.headers["range"] == "0-99"
        data = b"x" * 60 + rest
        assert client.request("PUT", f"{location}?digest={digest_of(data)}").status == 201

    def test_delete_cancels_an_upload(self, registry):
        client = registry.client()
        location = post(client)
        client.request("PATCH", location, b"abc")
        assert client.request("DELETE", location).status == 204
        response = registry.client().request("GET", location)
        assert (response.status, response.json()["errors"][0]["code"]) == (
            404,
            "BLOB_UPLOAD_UNKNOWN",
        )
        assert staged_files(registry) == []

    def test_an_upload_is_not_reachable_from_another_repository(self, registry):
        location = post(registry.client(), "app")
        other = location.replace("/local/app/", "/local/other/")
        assert registry.client().request("GET", other).status == 404

    def test_a_digest_mismatch_stores_nothing(self, registry):
        data = os.urandom(2000)
        wrong = digest_of(b"something else")
        client = registry.client()
        location = post(client)
        response = client.request("PUT", f"{location}?digest={wrong}", data)
        assert response.status == 400
        error = response.json()["errors"][0]
        assert error["code"] == "DIGEST_INVALID"
        assert wrong in error["message"] and digest_of(data) in error["message"]
        assert registry.get(f"/v2/local/app/blobs/{wrong}").status == 404
        assert registry.get(f"/v2/local/app/blobs/{digest_of(data)}").status == 404
        assert staged_files(registry) == []
        assert registry.client().request("GET", location).status == 404

    def test_abandoned_uploads_expire(self, registry):
        client = registry.client()
        location = post(client)
        client.request("PATCH", location, b"abc")
        registry.clock.advance(registry.uploads.expire_after - 1)
        # A request starts the wait again.
        assert registry.client().request("GET", location).status == 204
        registry.clock.advance(registry.uploads.expire_after - 1)
        assert registry.client().request("GET", location).status == 204
        registry.clock.advance(registry.uploads.expire_after)
        assert registry.client().request("GET", location).status == 404
        assert staged_files(registry) == []
        assert registry.uploads.expired == 1

    def test_an_upload_receiving_a_body_does_not_expire(self, registry):
        client = registry.client()
        location = post(client)
        client.clear()
        client.send("PATCH", location, {"Content-Length": "100"})
        client.send_body(b"x" * 50)
        registry.clock.advance(registry.uploads.expire_after * 3)
        client.send_body(b"x" * 50)
        assert client.response().status == 202
        assert client.response().headers["range"] == "0-99"

    def test_a_client_gone_mid_patch_leaves_what_arrived(self, registry):
        client = registry.client()
        location = post(client)
        client.clear()
        client.send("PATCH", location, {"Content-Length": "100"})
        client.send_body(b"x" * 60)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            client.disconnect()
        finally:
            globalLogPublisher.removeObserver(events.append)
        status = registry.client().request("GET", location)
        assert (status.status, status.headers["range"]) == (204, "0-59")
        # A cancelled push is no internal error: one info line, no traceback.
        assert [e for e in events if e.get("log_failure")] == []
        gone = [e for e in events if "client went away" in (e.get("log_format") or "")]
        assert [e["method"] for e in gone] == ["PATCH"]

    def test_a_client_gone_mid_manifest_is_no_internal_error(self, registry):
        client = registry.client()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            client.send(
                "PUT",
                "/v2/local/app/manifests/1",
                {"Content-Length": "100", "Content-Type": OCI_MANIFEST},
            )
            client.send_body(b"{")
            client.disconnect()
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert [e for e in events if e.get("log_failure")] == []
        assert registry.get("/v2/local/app/manifests/1").status == 404

    def test_a_single_post_cut_short_is_dropped_at_once(self, registry):
        # Its id was never sent, so only expiry could end it otherwise.
        client = registry.client()
        digest = digest_of(b"x" * 100)
        client.send(
            "POST", f"/v2/local/app/blobs/uploads/?digest={digest}", {"Content-Length": "100"}
        )
        client.send_body(b"x" * 60)
        assert len(registry.uploads) == 1
        client.disconnect()
        assert len(registry.uploads) == 0
        assert staged_files(registry) == []

    def test_uploads_in_progress_are_limited(self, registry):
        registry.uploads.max_uploads = 2
        client = registry.client()
        first = post(client)
        post(client)
        refused = client.request("POST", "/v2/local/app/blobs/uploads/")
        assert (refused.status, refused.json()["errors"][0]["code"]) == (429, "TOOMANYREQUESTS")
        assert client.request("DELETE", first).status == 204
        post(client)

    def test_mount_of_a_blob_that_is_there(self, registry):
        digest = push_blob(registry, b"shared layer", "one")
        response = registry.client().request(
            "POST", f"/v2/local/two/blobs/uploads/?mount={digest}&from=one"
        )
        assert response.status == 201
        assert response.headers["location"] == f"/v2/local/two/blobs/{digest}"
        assert response.headers["docker-content-digest"] == digest

    def test_mount_of_a_missing_blob_starts_an_upload(self, registry):
        missing = digest_of(b"nobody has this")
        response = registry.client().request(
            "POST", f"/v2/local/two/blobs/uploads/?mount={missing}&from=one"
        )
        assert response.status == 202
        assert "/v2/local/two/blobs/uploads/" in response.headers["location"]

    def test_head_of_a_missing_blob_before_a_push(self, registry):
        response = registry.head(f"/v2/local/app/blobs/{digest_of(b'new')}")
        assert response.status == 404
        assert registry.upstream.seen == []

    def test_the_connection_stays_open_between_bodiless_requests(self, registry):
        client = registry.client()
        location = post(client)
        assert client.request("GET", location).status == 204
        assert client.request("DELETE", location).status == 204
        assert not client.transport.disconnected


class TestLargeBodies:
    def test_reading_pauses_while_the_disk_is_behind(self, tmp_path):
        spools = []

        class SlowSpool:
            """Writes only when the test says so."""

            def __init__(self, fd, hasher):
                self.written = 0
                self.failure = None
                self.queued = []
                self.hasher = hasher
                self.wake = None
                spools.append(self)

            def append(self, data):
                self.queued.append(data)
                self.hasher.update(data)

            def catch_up(self):
                self.written += sum(map(len, self.queued))
                self.queued = []
                wake, self.wake = self.wake, None
                if wake is not None:
                    wake()

            def wake_on_progress(self, seen, callback):
                self.wake = callback

            def close(self):
                from twisted.internet.defer import succeed

                return succeed(self.hasher.hexdigest())

            def abandon(self):
                pass

        registry = MemoryRegistry(tmp_path, registries=[HUB, LOCAL], spool=SlowSpool)
        data = os.urandom(20 << 20)
        client = registry.client()
        location = post(client)
        client.clear()
        client.send("PATCH", location, {"Content-Length": str(len(data))})
        offset = 0
        while client.transport.producerState != "paused" and offset < len(data):
            client.send_body(data[offset : offset + 65536])
            offset += 65536
        assert client.transport.producerState == "paused"
        assert 8 << 20 < offset < 10 << 20
        spools[-1].catch_up()
        assert client.transport.producerState == "producing"
        client.send_body(data[offset:])
        spools[-1].catch_up()
        assert client.response().status == 202

    def test_expect_100_continue(self, registry):
        data = os.urandom(1000)
        client = registry.client()
        location = post(client)
        client.clear()
        client.send(
            "PUT",
            f"{location}?digest={digest_of(data)}",
            {"Content-Length": str(len(data)), "Expect": "100-continue"},
        )
        assert client.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.clear()
        client.send_body(data)
        assert client.response().status == 201
        # A refusal is final: no 100 Continue after it.
        refused = tcp_like_client(registry)
        refused.send(
            "PUT",
            "/v2/alpine/manifests/1",
            {"Content-Length": "1000", "Expect": "100-continue"},
        )
        assert b"100 Continue" not in refused.transport.value()
        assert refused.response().status == 403

    def test_a_refused_push_answers_at_once_and_closes(self, registry):
        # The body is not read to its end: 1 GiB refused costs nothing.
        client = tcp_like_client(registry)
        client.send("PUT", "/v2/alpine/manifests/1", {"Content-Length": str(1 << 30)})
        response = client.response()
        assert response.status == 403
        assert response.headers["connection"] == "close"
        client.send_body(b"x" * (2 << 20))
        assert client.transport.disconnecting


class TestManifests:
    def test_a_pushed_image_is_pulled_by_tag_and_digest(self, registry):
        response, body, _ = push_image(registry, "1.0")
        assert response.status == 201
        digest = digest_of(body)
        assert response.headers["docker-content-digest"] == digest
        assert response.headers["location"] == f"/v2/local/app/manifests/{digest}"
        for reference in ("1.0", digest):
            pulled = registry.get(f"/v2/local/app/manifests/{reference}")
            assert (pulled.status, pulled.body) == (200, body)
            assert pulled.headers["content-type"] == OCI_MANIFEST
            assert pulled.headers["docker-content-digest"] == digest
        tags = registry.get("/v2/local/app/tags/list")
        assert tags.json() == {"name": "app", "tags": ["1.0"]}
        assert registry.upstream.seen == []

    def test_tags_are_listed_in_pages_and_heads_answer(self, registry):
        _, body, _ = push_image(registry, "a")
        for tag in ("c", "b"):
            response = registry.client().request(
                "PUT", f"/v2/local/app/manifests/{tag}", body, {"Content-Type": OCI_MANIFEST}
            )
            assert response.status == 201
        page = registry.get("/v2/local/app/tags/list?n=2")
        assert page.json()["tags"] == ["a", "b"]
        assert page.headers["link"] == '</v2/local/app/tags/list?n=2&last=b>; rel="next"'
        assert registry.get("/v2/local/app/tags/list?n=2&last=b").json()["tags"] == ["c"]
        head = registry.head("/v2/local/app/manifests/b")
        assert (head.status, head.body) == (200, b"")
        assert head.headers["content-length"] == str(len(body))
        assert head.headers["docker-content-digest"] == digest_of(body)
        missing = registry.get("/v2/local/nothing/tags/list")
        assert (missing.status, missing.json()["errors"][0]["code"]) == (404, "NAME_UNKNOWN")

    @pytest.mark.parametrize("n", ["-1", "abc", ""])
    def test_a_page_size_that_is_no_count_is_the_clients_error(self, registry, n):
        push_image(registry, "a")
        response = registry.get(f"/v2/local/app/tags/list?n={n}")
        assert response.status == 400
        assert response.json()["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"

    def test_a_page_of_no_tags(self, registry):
        push_image(registry, "a")
        response = registry.get("/v2/local/app/tags/list?n=0")
        assert (response.status, response.json()["tags"]) == (200, [])
        assert "link" not in response.headers

    def test_a_missing_blob_is_named(self, registry):
        config = push_blob(registry, b"{}")
        missing = digest_of(b"never pushed")
        body = image_manifest(config, [(missing, 12)])
        response = registry.client().request(
            "PUT", "/v2/local/app/manifests/1", body, {"Content-Type": OCI_MANIFEST}
        )
        assert response.status == 400
        error = response.json()["errors"][0]
        assert error["code"] == "MANIFEST_BLOB_UNKNOWN"
        assert missing in error["message"] and error["detail"] == {"digest": missing}
        assert registry.get("/v2/local/app/manifests/1").status == 404

    @pytest.mark.parametrize(
        "body, content_type, code",
        [
            (b"{not json", OCI_MANIFEST, "MANIFEST_INVALID"),
            (b"[]", OCI_MANIFEST, "MANIFEST_INVALID"),
            (b'{"schemaVersion": 2}', "text/plain", "MANIFEST_INVALID"),
            (
                b'{"schemaVersion": 2, "mediaType": "' + OCI_INDEX.encode() + b'"}',
                OCI_MANIFEST,
                "MANIFEST_INVALID",
            ),
        ],
    )
    def test_invalid_manifests(self, registry, body, content_type, code):
        response = registry.client().request(
            "PUT", "/v2/local/app/manifests/1", body, {"Content-Type": content_type}
        )
        assert (response.status, response.json()["errors"][0]["code"]) == (400, code)

    @pytest.mark.parametrize("opening", ["[", '{"a":'])
    def test_a_manifest_nested_too_deeply_is_invalid(self, registry, opening):
        closing = "]" if opening == "[" else "}"
        body = (opening * 100_000 + "1" + closing * 100_000).encode()
        response = registry.client().request(
            "PUT", "/v2/local/app/manifests/1", body, {"Content-Type": OCI_MANIFEST}
        )
        assert response.status == 400
        error = response.json()["errors"][0]
        assert error["code"] == "MANIFEST_INVALID" and "nests too deeply" in error["message"]

    def test_a_manifest_over_4_mib_is_413(self, registry):
        body = b" " * ((4 << 20) + 1)
        response = tcp_like_client(registry).request(
            "PUT", "/v2/local/app/manifests/1", body, {"Content-Type": OCI_MANIFEST}
        )
        assert response.status == 413

    def test_a_chunked_manifest_over_4_mib_is_413(self, registry):
        client = tcp_like_client(registry)
        client.send(
            "PUT",
            "/v2/local/app/manifests/1",
            {"Content-Type": OCI_MANIFEST, "Transfer-Encoding": "chunked"},
        )
        piece = b" " * (1 << 20)
        for _ in range(5):
            client.send_body(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert client.response().status == 413

    def test_a_digest_reference_must_match_the_body(self, registry):
        _, body, _ = push_image(registry)
        response = registry.client().request(
            "PUT",
            f"/v2/local/app/manifests/{digest_of(b'other')}",
            body,
            {"Content-Type": OCI_MANIFEST},
        )
        assert response.json()["errors"][0]["code"] == "DIGEST_INVALID"

    def test_an_index_needs_its_manifests(self, registry):
        _, body, _ = push_image(registry, "amd64")
        child = digest_of(body)
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": len(body)}],
        }
        response = registry.client().request(
            "PUT",
            "/v2/local/app/manifests/multi",
            json.dumps(index).encode(),
            {"Content-Type": OCI_INDEX},
        )
        assert response.status == 201
        index["manifests"][0]["digest"] = digest_of(b"missing")
        response = registry.client().request(
            "PUT",
            "/v2/local/app/manifests/multi",
            json.dumps(index).encode(),
            {"Content-Type": OCI_INDEX},
        )
        assert response.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"

    def test_subject_and_referrers(self, registry):
        _, subject_body, _ = push_image(registry, "1")
        subject = digest_of(subject_body)
        response, referrer_body, _ = push_image(
            registry,
            "sig",
            subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)},
            artifactType="application/example.signature",
        )
        assert response.status == 201
        assert response.headers["oci-subject"] == subject
        listing = registry.get(f"/v2/local/app/referrers/{subject}")
        assert listing.status == 200
        assert listing.headers["content-type"] == OCI_INDEX
        (descriptor,) = listing.json()["manifests"]
        assert descriptor["digest"] == digest_of(referrer_body)
        assert descriptor["artifactType"] == "application/example.signature"
        filtered = registry.get(f"/v2/local/app/referrers/{subject}?artifactType=application/other")
        assert filtered.json()["manifests"] == []
        assert filtered.headers["oci-filters-applied"] == "artifactType"

    def test_delete_of_a_tag_and_of_a_manifest(self, registry):
        _, body, _ = push_image(registry, "1")
        digest = digest_of(body)
        registry.client().request(
            "PUT", "/v2/local/app/manifests/2", body, {"Content-Type": OCI_MANIFEST}
        )
        assert registry.client().request("DELETE", "/v2/local/app/manifests/1").status == 202
        assert registry.get("/v2/local/app/manifests/1").status == 404
        assert registry.get("/v2/local/app/manifests/2").status == 200
        assert (
            registry.client().request("DELETE", f"/v2/local/app/manifests/{digest}").status == 202
        )
        for reference in ("2", digest):
            response = registry.get(f"/v2/local/app/manifests/{reference}")
            assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert registry.client().request("DELETE", "/v2/local/app/manifests/1").status == 404

    def test_pushed_content_is_pinned(self, tmp_path):
        registry = MemoryRegistry(tmp_path, registries=[HUB, LOCAL], size_limit=20_000)
        response, body, layer = push_image(registry, "1")
        assert response.status == 201
        # Pulls through the cache fill it far past its limit.
        for _ in range(5):
            digest = registry.upstream.add_blob(os.urandom(10_000))
            assert registry.get(f"/v2/alpine/blobs/{digest}").status == 200
        assert registry.get(f"/v2/local/app/manifests/{digest_of(body)}").body == body
        assert registry.get(f"/v2/local/app/blobs/{digest_of(layer)}").body == layer
        registry.storage.update_figures()
        figures = registry.storage.figures
        assert figures.pinned_size >= len(layer) + len(body)
        assert figures.pinned_entries >= 4  # two blobs, the manifest, its records


class TestGarbageCollection:
    def collect(self, registry, grace=3600.0):
        results = []
        Deferred.fromCoroutine(
            hosted_gc.collect(registry.storage, registry.clock.seconds(), grace)
        ).addBoth(results.append)
        (collected,) = results
        return collected

    def test_blobs_no_manifest_names_are_removed_after_the_grace_period(self, registry):
        _, body, layer = push_image(registry, "1")
        stray = push_blob(registry, b"pushed, never used")
        pulled = registry.upstream.add_blob(b"pulled through the cache")
        assert registry.get(f"/v2/alpine/blobs/{pulled}").status == 200
        # Within the grace period: a push may still be on its way.
        collected = self.collect(registry)
        assert (collected.blobs, collected.kept_for_grace) == ([], 1)
        registry.clock.advance(3601)
        assert self.collect(registry).blobs == [stray]
        assert registry.get(f"/v2/local/app/blobs/{stray}").status == 404
        assert registry.get(f"/v2/local/app/blobs/{digest_of(layer)}").body == layer
        assert registry.get(f"/v2/alpine/blobs/{pulled}").status == 200
        # Once the manifest is deleted, its blobs and itself go too.
        digest = digest_of(body)
        assert (
            registry.client().request("DELETE", f"/v2/local/app/manifests/{digest}").status == 202
        )
        registry.clock.advance(3601)
        collected = self.collect(registry)
        assert collected.manifests == [digest]
        assert sorted(collected.blobs) == sorted([digest_of(layer), digest_of(b"{}")])
        assert registry.get(f"/v2/alpine/blobs/{pulled}").status == 200

    def test_a_manifest_check_restarts_the_grace_period_of_its_blobs(self, registry):
        layer = push_blob(registry, b"layer pushed long ago")
        config = push_blob(registry, b"{}")
        registry.clock.advance(7200)
        body = image_manifest(config, [(layer, 21)])
        response = registry.client().request(
            "PUT", "/v2/local/app/manifests/1", body, {"Content-Type": OCI_MANIFEST}
        )
        assert response.status == 201
        assert self.collect(registry, grace=60).blobs == []


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class TestWhoMayPush:
    @pytest.fixture
    def guarded(self, tmp_path):
        hashed = bcrypt.hashpw(b"s3cret-pw", bcrypt.gensalt(4)).decode()
        users = PushUsers(tmp_path / "push.htpasswd", (("ci", Secret(hashed)),))
        server = ServerConfig(push_users=users)
        return MemoryRegistry(tmp_path, registries=[HUB, LOCAL], server=server)

    def test_a_client_outside_push_from_is_denied(self, tmp_path):
        server = ServerConfig(push_from=("10.0.0.0/8",))
        registry = MemoryRegistry(tmp_path, registries=[HUB, LOCAL], server=server)
        response = registry.client().request("POST", "/v2/local/app/blobs/uploads/")
        assert response.status == 403
        error = response.json()["errors"][0]
        assert error["code"] == "DENIED" and "push_from" in error["message"]
        # Pulls stay open.
        assert registry.get("/v2/").status == 200

    def test_push_from_takes_other_networks(self, tmp_path):
        server = ServerConfig(push_from=("192.0.2.0/24",))
        registry = MemoryRegistry(tmp_path, registries=[HUB, LOCAL], server=server)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        response = registry.client(transport).request("POST", "/v2/local/app/blobs/uploads/")
        assert response.status == 202

    def test_the_ping_sends_clients_to_the_token_realm(self, guarded):
        response = guarded.get("/v2/")
        assert response.status == 401
        challenge = response.headers["www-authenticate"]
        assert challenge == 'Bearer realm="http://localhost:5050/auth/token",service="txregistry"'

    @pytest.mark.parametrize(
        "host, realm_host",
        [
            ("[::1]:5050", "[::1]:5050"),
            ("registry.example:5050", "registry.example:5050"),
            # Not host names: the realm names the address listened on instead.
            ("..:5050", "10.0.0.1:12345"),
            ("-a-.example", "10.0.0.1:12345"),
            ("[::1%eth0]:5050", "10.0.0.1:12345"),
        ],
    )
    def test_the_realm_names_the_host_asked_for_only_when_it_is_one(
        self, guarded, host, realm_host
    ):
        response = guarded.get("/v2/", {"Host": host})
        realm = f'realm="http://{realm_host}/auth/token"'
        assert realm in response.headers["www-authenticate"]

    def test_anonymous_clients_get_a_pull_token_and_pull(self, guarded):
        token = guarded.get("/auth/token?service=txregistry&scope=repository:local/app:pull")
        assert token.status == 200
        bearer = {"Authorization": "Bearer " + token.json()["token"]}
        assert guarded.get("/v2/", bearer).status == 200
        digest = guarded.upstream.add_blob(b"public")
        assert guarded.get(f"/v2/alpine/blobs/{digest}", bearer).status == 200
        # ... and cannot push with it.
        response = guarded.client().request("POST", "/v2/local/app/blobs/uploads/", b"", bearer)
        assert response.status == 401
        assert "pushing needs credentials: docker login" in response.body.decode()

    def test_a_push_without_credentials_is_challenged(self, guarded):
        response = guarded.client().request("POST", "/v2/local/app/blobs/uploads/")
        assert response.status == 401
        assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert response.headers["www-authenticate"].startswith('Bearer realm="http://localhost')
        # The repository as the client names it, as a scope must.
        assert 'scope="repository:local/app:pull,push"' in response.headers["www-authenticate"]

    def test_a_push_token_for_valid_credentials(self, guarded):
        token = guarded.get(
            "/auth/token?service=txregistry", {"Authorization": basic("ci", "s3cret-pw")}
        )
        assert token.status == 200
        bearer = {"Authorization": "Bearer " + token.json()["token"]}
        response = guarded.client().request("POST", "/v2/local/app/blobs/uploads/", b"", bearer)
        assert response.status == 202
        # Tokens expire.
        guarded.clock.advance(301)
        response = guarded.client().request("POST", "/v2/local/app/blobs/uploads/", b"", bearer)
        assert response.status == 401

    def test_containerds_oauth2_password_grant(self, guarded):
        client = guarded.client()
        form = b"grant_type=password&service=txregistry&client_id=containerd-client"
        good = client.request(
            "POST",
            "/auth/token",
            form + b"&username=ci&password=s3cret-pw",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert good.status == 200
        bearer = {"Authorization": "Bearer " + good.json()["access_token"]}
        response = guarded.client().request("POST", "/v2/local/app/blobs/uploads/", b"", bearer)
        assert response.status == 202
        bad = guarded.client().request(
            "POST",
            "/auth/token",
            form + b"&username=ci&password=nope",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert bad.status == 401

    def test_basic_credentials_push_directly(self, guarded):
        headers = {"Authorization": basic("ci", "s3cret-pw")}
        response = guarded.client().request("POST", "/v2/local/app/blobs/uploads/", b"", headers)
        assert response.status == 202

    def test_wrong_passwords_are_refused_and_never_logged(self, guarded):
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            bad = {"Authorization": basic("ci", "wrong-password-123")}
            assert guarded.get("/auth/token?service=txregistry", bad).status == 401
            response = guarded.client().request("POST", "/v2/local/app/blobs/uploads/", b"", bad)
            assert response.status == 401
            assert "wrong-password-123" not in response.body.decode()
            good = {"Authorization": basic("ci", "s3cret-pw")}
            assert guarded.get("/auth/token", good).status == 200
        finally:
            globalLogPublisher.removeObserver(events.append)
        logged = repr(events)
        assert "wrong-password-123" not in logged and "s3cret-pw" not in logged
        assert "refused a push token" in logged

    @pytest.mark.parametrize("credentials", ["!!!", "OnBhc3N3b3Jk", "bm8tY29sb24="])
    def test_malformed_basic_credentials_are_named_so(self, guarded, credentials):
        # "!!!" is no base64; the others are ":password" (no user) and "no-colon".
        headers = {"Authorization": "Basic " + credentials}
        push = guarded.client().request("POST", "/v2/local/app/blobs/uploads/", b"", headers)
        token = guarded.get("/auth/token", headers)
        for response in (push, token):
            assert response.status == 401
            message = response.json()["errors"][0]["message"]
            assert "not base64 of USER:PASSWORD" in message and "None" not in message

    @pytest.mark.parametrize("framing", ["length", "chunked"])
    def test_a_token_request_with_a_large_body_is_refused_before_it_is_kept(self, guarded, framing):
        # Twisted would keep the whole body, then parse the form into memory.
        client = tcp_like_client(guarded)
        size = 10 << 20
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        headers.update(
            {"Content-Length": str(size)}
            if framing == "length"
            else {"Transfer-Encoding": "chunked"}
        )
        client.send("POST", "/auth/token", headers)
        response = client.response()
        assert response.status == 413
        assert response.json()["errors"][0]["code"] == "SIZE_INVALID"
        chunk = b"username=" + b"a" * (1 << 20)
        if framing == "chunked":
            chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        client.send_body(chunk)
        client.send_body(chunk)
        # What was read past the answer was dropped, and the connection closed.
        assert response.headers["connection"] == "close"
        assert client.transport.disconnecting

    def test_a_small_token_form_is_still_read(self, guarded):
        form = b"grant_type=password&username=ci&password=s3cret-pw"
        response = guarded.client().request(
            "POST", "/auth/token", form, {"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert response.status == 200

    def test_a_long_user_name_is_not_echoed_whole(self, guarded):
        name = "u" * 3000
        headers = {"Authorization": basic(name, "x")}
        for response in (
            guarded.get("/auth/token", headers),
            guarded.client().request("POST", "/v2/local/app/blobs/uploads/", b"", headers),
        ):
            assert response.status == 401
            assert len(response.body) < 1000

    def test_a_password_longer_than_bcrypt_reads_is_checked_as_htpasswd_does(self, tmp_path):
        # htpasswd -B hashes the first 72 bytes, and htpasswd -v checks those.
        long_password = "p" * 80
        hashed = bcrypt.hashpw(long_password[:72].encode(), bcrypt.gensalt(4)).decode()
        users = PushUsers(tmp_path / "push.htpasswd", (("ci", Secret(hashed)),))
        registry = MemoryRegistry(
            tmp_path, registries=[HUB, LOCAL], server=ServerConfig(push_users=users)
        )
        good = registry.get("/auth/token", {"Authorization": basic("ci", long_password)})
        assert good.status == 200
        bad = registry.get("/auth/token", {"Authorization": basic("ci", "q" * 80)})
        assert bad.status == 401

    def test_pushes_to_a_pull_through_registry_are_denied_even_with_credentials(self, guarded):
        headers = {"Authorization": basic("ci", "s3cret-pw")}
        response = guarded.client().request("POST", "/v2/alpine/blobs/uploads/", b"", headers)
        assert response.status == 403
        assert guarded.upstream.seen == []


class TestEarlyAnswers:
    """
    An answer given from a request's headers alone (a 401 before a token)
    to a body that is short: containerd retries a 401'd manifest PUT and
    needs the first body to have been taken (issue 12, see bodies.py).
    """

    CREDENTIALS = {"Authorization": basic("ci", "s3cret-pw")}

    @pytest.fixture
    def guarded(self, tmp_path):
        hashed = bcrypt.hashpw(b"s3cret-pw", bcrypt.gensalt(4)).decode()
        users = PushUsers(tmp_path / "push.htpasswd", (("ci", Secret(hashed)),))
        return MemoryRegistry(
            tmp_path, registries=[HUB, LOCAL], server=ServerConfig(push_users=users)
        )

    def manifest(self, registry: MemoryRegistry) -> bytes:
        """A manifest whose blobs are pushed already, as ctr finds them."""
        digests = []
        for data in (b"{}", os.urandom(3000)):
            digest = digest_of(data)
            response = registry.client().request(
                "POST", f"/v2/local/app/blobs/uploads/?digest={digest}", data, self.CREDENTIALS
            )
            assert response.status == 201, response.body
            digests.append(digest)
        return image_manifest(digests[0], [(digests[1], 3000)])

    def test_a_401_to_a_manifest_put_waits_for_its_body_and_keeps_the_connection(self, guarded):
        body = self.manifest(guarded)
        client = tcp_like_client(guarded)
        headers = {"Content-Type": OCI_MANIFEST, "Content-Length": str(len(body))}
        # containerd sends the headers, then the body from a pipe.
        client.send("PUT", "/v2/local/app/manifests/1", headers)
        assert client.transport.value() == b""
        client.send_body(body[:100])
        assert client.transport.value() == b""
        client.send_body(body[100:])
        refused = client.response()
        assert refused.status == 401
        assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert refused.headers["www-authenticate"].startswith("Bearer ")
        assert "connection" not in refused.headers
        assert not client.transport.disconnecting
        # The retry, with credentials and the body again, on the same connection.
        client.clear()
        client.send("PUT", "/v2/local/app/manifests/1", {**headers, **self.CREDENTIALS})
        client.send_body(body)
        assert client.response().status == 201
        assert guarded.get("/v2/local/app/manifests/1").body == body

    def test_a_client_gone_before_the_body_leaves_no_answer_to_send(self, guarded):
        client = tcp_like_client(guarded)
        client.send("PUT", "/v2/local/app/manifests/1", {"Content-Length": "900"})
        client.send_body(b"{")
        client.disconnect()
        assert client.transport.value() == b""
        assert guarded.get("/v2/local/app/manifests/1").status == 404

    def test_a_chunked_body_is_answered_at_once_and_the_connection_closes(self, guarded):
        # Its length is unknown: it could be anything up to 4 MiB.
        client = tcp_like_client(guarded)
        client.send("PUT", "/v2/local/app/manifests/1", {"Transfer-Encoding": "chunked"})
        response = client.response()
        assert response.status == 401
        assert response.headers["connection"] == "close"
        client.send_body(b"3\r\n{}\n\r\n0\r\n\r\n")
        assert client.transport.disconnecting
