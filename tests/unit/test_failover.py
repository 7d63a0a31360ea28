"""
Failover across mirrors, in memory: order, what makes a mirror be skipped,
what the client is told, timeouts and backoff on a Clock, and digest-only
mirrors that are never asked what a tag means.
"""

import json

import pytest
from harness.memory import OCI_MANIFEST, FakeRegistry, MemoryRegistry
from twisted.web.server import NOT_DONE_YET

from txregistry.config import MirrorConfig, RegistryConfig, UpstreamConfig
from txregistry.oci.reference import Digest

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()


@pytest.fixture
def net(tmp_path):
    return Mirrors(tmp_path)


class Mirrors:
    """txregistry with mirrors a.test, b.test (both trusted) and c.test (digest-only)."""

    def __init__(self, tmp_path, **upstream):
        self.a, self.b, self.c = FakeRegistry(), FakeRegistry(), FakeRegistry()
        registry = RegistryConfig(
            "docker.io",
            (
                MirrorConfig("https://a.test"),
                MirrorConfig("https://b.test"),
                MirrorConfig("https://c.test", resolve_tags=False),
            ),
            default=True,
            upstream=UpstreamConfig(**upstream),
        )
        self.tx = MemoryRegistry(
            tmp_path,
            registries=[registry],
            hosts={"a.test": self.a, "b.test": self.b, "c.test": self.c},
        )
        self.agent = self.tx.agent

    def asked(self, host):
        return [s.method + " " + s.url.split(host, 1)[1] for s in self.agent.to(host)]

    def health(self):
        return self.tx.upstreams["docker.io"].describe()["mirrors"]


def fail_with(status, retry_after=None):
    def hook(request):
        request.setResponseCode(status)
        if retry_after:
            request.setHeader(b"Retry-After", retry_after.encode())
        return json.dumps({"errors": [{"code": "X", "message": f"status {status}"}]}).encode()

    return hook


def test_mirrors_are_asked_in_order_and_the_first_answer_wins(net):
    net.a.add_manifest("library/x", "1", MANIFEST)
    net.b.add_manifest("library/x", "1", MANIFEST)
    assert net.tx.get("/v2/x/manifests/1").status == 200
    assert net.asked("a.test") == ["GET /v2/library/x/manifests/1"]
    assert net.asked("b.test") == [] and net.asked("c.test") == []


def test_refused_mirror_is_skipped_and_logged(net, logs):
    net.agent.refused.add("a.test")
    net.b.add_manifest("library/x", "1", MANIFEST)
    response = net.tx.get("/v2/x/manifests/1")
    assert (response.status, response.body) == (200, MANIFEST)
    assert logs.matching(
        "Mirror request failed: https://a.test manifest library/x:1: connection refused"
    )
    assert not logs.matching("All mirrors failed")


@pytest.mark.parametrize("status", [500, 502, 503, 429, 401, 403, 404])
def test_mirror_answering_status_is_skipped(net, status):
    net.a.hooks.append(fail_with(status))
    net.b.add_manifest("library/x", "1", MANIFEST)
    response = net.tx.get("/v2/x/manifests/1")
    assert (response.status, response.body) == (200, MANIFEST)
    assert len(net.asked("a.test")) == 1


def test_not_found_only_when_every_mirror_that_answered_said_so(net):
    assert net.tx.get("/v2/x/manifests/1").json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert len(net.asked("a.test")) == len(net.asked("b.test")) == 1
    net.agent.refused.add("a.test")
    assert net.tx.get("/v2/x/manifests/2").status == 404
    net.agent.refused.clear()
    net.a.hooks.append(fail_with(500))
    response = net.tx.get("/v2/x/manifests/3")
    assert response.status == 502
    assert "https://a.test: HTTP 500" in response.json()["errors"][0]["message"]


def test_total_failure_lists_every_mirror_and_logs_one_line(net, logs):
    net.agent.refused.add("a.test")
    net.b.hooks.append(fail_with(503))
    response = net.tx.get("/v2/x/manifests/1")
    assert response.status == 502
    (error,) = response.json()["errors"]
    assert error["detail"]["mirrors"] == [
        {"mirror": "https://a.test", "error": "connection refused"},
        {"mirror": "https://b.test", "error": "HTTP 503: status 503"},
    ]
    assert logs.matching(
        "All mirrors failed for docker.io manifest library/x:1:"
        " https://a.test: connection refused; https://b.test: HTTP 503: status 503"
    )


def test_rate_limited_everywhere_is_429_with_retry_after(net):
    net.a.hooks.append(fail_with(429, "60"))
    net.b.hooks.append(fail_with(429, "30"))
    response = net.tx.get("/v2/x/manifests/1")
    assert (response.status, response.headers["retry-after"]) == (429, "60")
    assert response.json()["errors"][0]["code"] == "TOOMANYREQUESTS"


@pytest.mark.parametrize("stall", ["connection", "headers"])
def test_mirror_without_response_headers_in_time_is_skipped(tmp_path, stall):
    net = Mirrors(tmp_path, response_timeout=30.0)
    if stall == "connection":
        net.agent.stalled.add("a.test")
    else:
        net.a.hooks.append(lambda request: NOT_DONE_YET)
    net.b.add_manifest("library/x", "1", MANIFEST)
    client = net.tx.client()
    client.send("GET", "/v2/x/manifests/1")
    net.tx.clock.advance(29.9)
    net.tx.pump()
    assert client.transport.value() == b"" and net.asked("b.test") == []
    net.tx.clock.advance(0.1)
    net.tx.pump()
    assert client.response().body == MANIFEST
    assert net.health()[0]["last_error"] == "no response within 30s"


def test_failing_mirror_backs_off_exponentially_and_recovers(tmp_path):
    net = Mirrors(tmp_path, backoff_initial=10.0, backoff_max=25.0)
    digest = net.b.add_blob(b"blob")
    net.agent.refused.add("a.test")

    def head():
        assert net.tx.head(f"/v2/x/blobs/{digest}").status == 200
        return len(net.asked("a.test"))

    assert head() == 1  # one failure: no backoff yet
    assert head() == 2  # two in a row: skipped for 10s
    assert net.health()[0]["state"] == "backoff"
    assert head() == 2
    net.tx.clock.advance(10)
    assert head() == 3  # tried again, failed again: skipped for 20s
    net.tx.clock.advance(19.9)
    assert head() == 3
    net.tx.clock.advance(0.1)
    assert head() == 4  # failed again: 40s, capped at 25s
    net.tx.clock.advance(24.9)
    assert head() == 4
    net.agent.refused.clear()
    net.tx.clock.advance(0.1)
    assert head() == 5  # answered: back to normal
    assert net.health()[0] == {
        "url": "https://a.test",
        "resolve_tags": True,
        "state": "ok",
        "consecutive_failures": 0,
    }


def test_mirrors_all_backing_off_are_tried_anyway(net):
    net.agent.refused.update({"a.test", "b.test"})
    for tag in ("1", "2"):
        assert net.tx.get(f"/v2/x/manifests/{tag}").status == 502
    assert [m["state"] for m in net.health()[:2]] == ["backoff", "backoff"]
    net.agent.refused.clear()
    net.b.add_manifest("library/x", "3", MANIFEST)
    assert net.tx.get("/v2/x/manifests/3").status == 200


def test_digest_only_mirror_is_never_asked_about_tags(net):
    net.agent.refused.update({"a.test", "b.test"})
    net.c.add_manifest("library/x", "1", MANIFEST)
    response = net.tx.get("/v2/x/manifests/1")
    assert response.status == 502
    assert [m["mirror"] for m in response.json()["errors"][0]["detail"]["mirrors"]] == [
        "https://a.test",
        "https://b.test",
    ]
    assert net.tx.head("/v2/x/manifests/1").status == 502
    assert net.tx.get("/v2/x/tags/list").status == 502
    assert net.asked("c.test") == []


def test_digest_only_mirror_serves_content_by_digest(net):
    net.agent.refused.update({"a.test", "b.test"})
    blob_digest = net.c.add_blob(b"layer bytes")
    manifest_digest = net.c.add_manifest("library/x", None, MANIFEST)
    blob = net.tx.get(f"/v2/x/blobs/{blob_digest}")
    manifest = net.tx.get(f"/v2/x/manifests/{manifest_digest}")
    assert (blob.status, blob.body) == (200, b"layer bytes")
    assert (manifest.status, manifest.body) == (200, MANIFEST)


def test_wrong_content_from_a_digest_only_mirror_is_refused_and_not_cached(net):
    net.agent.refused.update({"a.test", "b.test"})
    digest = str(Digest.of(MANIFEST))
    net.c.manifests[digest] = (OCI_MANIFEST, b'{"evil": true}')
    response = net.tx.get(f"/v2/x/manifests/{digest}")
    assert response.status == 502
    assert "manifest content has digest" in response.json()["errors"][0]["message"]
    assert net.tx.storage.get_manifest(Digest.parse(digest)).result is None
