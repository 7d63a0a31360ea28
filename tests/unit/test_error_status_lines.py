"""
What a client is told when the upstream fails, in memory: the status stays
one that makes clients fall back to their next mirror, and the reason is
in the status line as well as the OCI error body, since the Go clients
print only the status line of a 5xx and a HEAD answer has no body.
"""

import json

import pytest
from harness.memory import FakeRegistry, MemoryRegistry

from txregistry.config import MirrorConfig, RegistryConfig
from txregistry.oci.errors import MAX_REASON_PHRASE, RegistryError, reason_phrase

MANIFEST = json.dumps({"schemaVersion": 2, "layers": []}).encode()


@pytest.fixture
def tx(tmp_path):
    registry = RegistryConfig(
        "docker.io", (MirrorConfig("https://a.test"), MirrorConfig("https://b.test")), default=True
    )
    mirrors = {"a.test": FakeRegistry(), "b.test": FakeRegistry()}
    tx = MemoryRegistry(tmp_path, registries=[registry], hosts=dict(mirrors))
    tx.mirrors = mirrors
    return tx


class TestReasonPhrase:
    def test_plain_text_is_kept(self):
        assert reason_phrase("upstream https://a.test: connection refused") == (
            b"upstream https://a.test: connection refused"
        )

    def test_line_breaks_and_controls_cannot_end_the_status_line(self):
        phrase = reason_phrase("one\r\nInjected: yes\x00\ttwo")
        assert phrase == b"one Injected: yes? two"
        assert all(0x20 <= b <= 0x7E for b in phrase)

    def test_other_characters_are_escaped(self):
        assert reason_phrase("caf\u00e9 \u2014 down") == b"caf\\xe9 \\u2014 down"

    def test_a_long_reason_is_cut_and_says_so(self):
        phrase = reason_phrase("x" * 2000)
        assert len(phrase) == MAX_REASON_PHRASE and phrase.endswith(b"...")

    def test_5xx_carry_their_message_and_4xx_the_standard_phrase(self):
        assert RegistryError(502, "UNAVAILABLE", "it broke").reason_phrase() == b"it broke"
        assert RegistryError.manifest_unknown("no such tag").reason_phrase() is None
        explained = RegistryError(429, "TOOMANYREQUESTS", "slow down", in_status_line=True)
        assert explained.reason_phrase() == b"slow down"


class TestUpstreamFailures:
    def test_refused_mirrors_are_named_in_the_status_line_and_the_body(self, tx):
        tx.agent.refused.update({"a.test", "b.test"})
        response = tx.get("/v2/alpine/manifests/1")
        (error,) = response.json()["errors"]
        assert (response.status, error["code"]) == (502, "UNAVAILABLE")
        assert response.reason == error["message"]
        assert response.reason.startswith(
            "upstream registry docker.io is unavailable:"
            " https://a.test: connection refused; https://b.test: connection refused"
        )
        assert "txregistry doctor" in response.reason

    def test_a_head_answer_has_the_reason_but_no_body(self, tx):
        tx.agent.refused.update({"a.test", "b.test"})
        response = tx.head("/v2/alpine/manifests/1")
        assert (response.status, response.body) == (502, b"")
        assert "https://b.test: connection refused" in response.reason

    def test_a_mirror_that_times_out_is_named_with_the_timeout(self, tx):
        tx.agent.refused.add("a.test")
        tx.agent.stalled.add("b.test")
        client = tx.client()
        client.send("GET", "/v2/alpine/manifests/1")
        tx.clock.advance(31)
        response = client.response()
        assert response.status == 502
        assert (
            "https://a.test: connection refused; https://b.test: no response within 30s"
            in response.reason
        )

    def test_a_refusal_is_passed_on_with_its_reason_in_the_status_line(self, tx):
        def denied(request):
            request.setResponseCode(403)
            return json.dumps({"errors": [{"code": "DENIED", "message": "no pulls"}]}).encode()

        for mirror in tx.mirrors.values():
            mirror.hooks.append(denied)
        response = tx.get("/v2/alpine/manifests/1")
        assert response.status == 403
        assert response.reason == "upstream https://a.test refused the request: no pulls"
        head = tx.head("/v2/alpine/manifests/1")
        assert (head.status, head.body) == (403, b"")
        assert head.reason.startswith("upstream https://a.test refused the request")

    def test_an_unknown_manifest_keeps_the_standard_status_line(self, tx):
        response = tx.get("/v2/alpine/manifests/1")
        assert (response.status, response.reason) == (404, "Not Found")
