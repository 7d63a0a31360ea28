"""
Fleet mode, in memory: owners by rendezvous hashing, peers asked as
digest-only mirrors before the upstream, requests between peers that are
never passed on, a failing peer's backoff on a Clock, and bytes from a peer
that are verified like any mirror's.

This node is a.node; its peers b.node and c.node are fake registries on the
same fake network, holding what a peer would serve.
"""

import json
import os
from collections import Counter

import pytest
from harness.memory import OCI_MANIFEST, FakeRegistry, MemoryRegistry

from txregistry.config import FleetConfig, MirrorConfig, RegistryConfig, UpstreamConfig
from txregistry.oci.reference import Digest
from txregistry.upstream.peers import ranked, weight

A, B, C = "http://a.node:5050", "http://b.node:5050", "http://c.node:5050"
MARK = "txregistry-peer"


class Node:
    """txregistry as a.node, with peers b.node and c.node."""

    def __init__(self, tmp_path):
        self.b, self.c = FakeRegistry(), FakeRegistry()
        registry = RegistryConfig(
            "docker.io",
            (MirrorConfig("https://registry-1.docker.io"),),
            default=True,
            upstream=UpstreamConfig(),
        )
        self.tx = MemoryRegistry(
            tmp_path,
            registries=[registry],
            hosts={"b.node": self.b, "c.node": self.c},
            fleet=FleetConfig(A, (B, C), UpstreamConfig(backoff_initial=10, backoff_max=60)),
        )
        self.upstream = self.tx.upstream
        self.agent = self.tx.agent

    def sent_to(self, host):
        return [s for s in self.agent.to(host)]

    def peers(self):
        return {p["url"]: p for p in self.tx.fleet.describe()["peers"]}


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


def content_ranked(*order, size=50_000):
    """Random bytes whose digest ranks the nodes in C{order} (the owner first)."""
    while True:
        data = os.urandom(size)
        digest = str(Digest.of(data))
        if ranked([A, B, C], digest)[: len(order)] == list(order):
            return data, digest


def test_rendezvous_is_stable_and_even():
    digests = [str(Digest.of(str(i).encode())) for i in range(3000)]
    peers = [A, B, C, "http://d.node:5050"]
    owners = [ranked(peers, d)[0] for d in digests]
    # The same on every node, whatever order its list is in.
    assert owners == [ranked(list(reversed(peers)), d)[0] for d in digests]
    shares = Counter(owners)
    assert all(600 <= shares[p] <= 900 for p in peers), shares
    assert weight(A, digests[0]) != weight(B, digests[0])


def test_a_peer_leaving_moves_only_the_digests_it_owned():
    digests = [str(Digest.of(str(i).encode())) for i in range(3000)]
    peers = [A, B, C, "http://d.node:5050"]
    moved = 0
    for digest in digests:
        before = ranked(peers, digest)
        after = ranked([A, B, "http://d.node:5050"], digest)
        if before[0] == C:
            moved += 1
            assert after[0] == before[1], "a departed owner's digest goes to its runner-up"
        else:
            assert after[0] == before[0], "no other digest moves"
    assert 600 <= moved <= 900


def test_the_owner_is_asked_first_by_the_registrys_name_and_marked(node):
    data, digest = content_ranked(B, A)
    node.upstream.add_blob(data)
    node.b.add_blob(data)
    response = node.tx.get(f"/v2/alpine/blobs/{digest}")
    assert (response.status, response.body, response.complete) == (200, data, True)
    (asked,) = node.sent_to("b.node")
    assert asked.url == f"{B}/v2/docker.io/library/alpine/blobs/{digest}"
    assert asked.headers[MARK] == A
    assert "authorization" not in asked.headers
    assert node.upstream.requests("GET", digest) == []
    assert node.sent_to("c.node") == []
    # Cached here: the next pull asks nobody.
    assert node.tx.get(f"/v2/alpine/blobs/{digest}").headers["x-cache"] == "HIT"
    assert len(node.sent_to("b.node")) == 1
    assert 'txregistry_peer_fetches_total{peer="http://b.node:5050"} 1.0' in (
        node.tx.metrics.render().decode()
    )


def test_peers_are_asked_in_rank_order_down_to_this_node(node):
    data, digest = content_ranked(C, B, A)
    node.upstream.add_blob(data)
    node.b.add_blob(data)
    # The owner, c, has no answer to give: b, the runner-up, is asked next.
    node.agent.refused.add("c.node")
    response = node.tx.get(f"/v2/alpine/blobs/{digest}")
    assert (response.status, response.body) == (200, data)
    assert [s.url for s in node.sent_to("c.node")] == [
        f"{C}/v2/docker.io/library/alpine/blobs/{digest}"
    ]
    assert len(node.sent_to("b.node")) == 1
    assert node.upstream.requests("GET", digest) == []


def test_the_owner_fetches_from_the_upstream_itself(node):
    data, digest = content_ranked(A)
    node.upstream.add_blob(data)
    response = node.tx.get(f"/v2/alpine/blobs/{digest}")
    assert (response.status, response.body) == (200, data)
    assert node.sent_to("b.node") == [] and node.sent_to("c.node") == []
    assert len(node.upstream.requests("GET", digest)) == 1


def test_a_request_from_a_peer_is_never_passed_on(node):
    data, digest = content_ranked(B, A)
    node.upstream.add_blob(data)
    node.b.add_blob(data)
    response = node.tx.get(f"/v2/docker.io/library/alpine/blobs/{digest}", {MARK: C})
    assert (response.status, response.body) == (200, data)
    assert node.sent_to("b.node") == []
    assert len(node.upstream.requests("GET", digest)) == 1


def test_a_mark_from_a_node_outside_the_fleet_counts_for_nothing(node):
    data, digest = content_ranked(B, A)
    node.b.add_blob(data)
    response = node.tx.get(f"/v2/alpine/blobs/{digest}", {MARK: "http://elsewhere:5050"})
    assert (response.status, response.body) == (200, data)
    assert len(node.sent_to("b.node")) == 1


def test_a_peer_that_does_not_answer_backs_off_on_the_clock(node, logs):
    data, digest = content_ranked(B, A)
    node.upstream.add_blob(data)
    node.b.add_blob(data)
    node.agent.refused.add("b.node")
    response = node.tx.get(f"/v2/alpine/blobs/{digest}")
    assert (response.status, response.body) == (200, data)
    assert len(node.upstream.requests("GET", digest)) == 1
    assert logs.matching(
        f"Peer request failed: {B} blob library/alpine@{digest}: connection refused;"
        " asking the next peer or the upstream"
    )
    peer = node.peers()[B]
    assert (peer["state"], peer["consecutive_failures"], peer["backoff_seconds"]) == (
        "backoff",
        1,
        10.0,
    )
    assert "resolve_tags" not in peer
    # While it backs off, what it owns goes to this node (b ranked it first).
    other, other_digest = content_ranked(B, A)
    node.upstream.add_blob(other)
    assert node.tx.get(f"/v2/alpine/blobs/{other_digest}").body == other
    assert len(node.sent_to("b.node")) == 1
    metrics = node.tx.metrics.render().decode()
    assert 'txregistry_peer_failures_total{peer="http://b.node:5050"} 1.0' in metrics
    # Once the backoff is over, it is asked again.
    node.agent.refused.clear()
    node.tx.clock.advance(10)
    third, third_digest = content_ranked(B, A)
    node.b.add_blob(third)
    assert node.tx.get(f"/v2/alpine/blobs/{third_digest}").body == third
    assert len(node.sent_to("b.node")) == 2
    assert node.peers()[B]["state"] == "ok"


def test_an_error_answer_from_a_peer_falls_back_without_backoff(node):
    data, digest = content_ranked(B, A)
    node.upstream.add_blob(data)

    def unavailable(request):
        request.setResponseCode(502)
        return json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "upstream"}]}).encode()

    node.b.hooks.append(unavailable)
    response = node.tx.get(f"/v2/alpine/blobs/{digest}")
    assert (response.status, response.body) == (200, data)
    assert len(node.upstream.requests("GET", digest)) == 1
    peer = node.peers()[B]
    assert (peer["state"], peer["consecutive_failures"]) == ("ok", 0)
    assert node.tx.fleet.states[0].failures_total == 1


def test_a_404_from_the_owner_is_checked_with_the_upstream(node):
    data, digest = content_ranked(B, A)
    node.upstream.add_blob(data)
    response = node.tx.get(f"/v2/alpine/blobs/{digest}")
    assert (response.status, response.body) == (200, data)
    assert node.tx.fleet.states[0].failures_total == 0


def test_bytes_from_a_peer_are_verified(node):
    data, digest = content_ranked(B, A, size=300_000)
    node.upstream.add_blob(data)
    node.b.add_blob(data)
    held = node.b.hold_blob(digest)
    client = node.tx.client()
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    held[0].write(data[:100_000])
    held[0].write(data[100_000:-1] + bytes([data[-1] ^ 1]))
    held[0].finish()
    node.tx.pump()
    # The last byte is never sent before the check: the client is cut off.
    response = client.response()
    assert response.status == 200
    assert not response.complete and response.aborted
    assert response.body == data[:-1]
    assert node.tx.storage.open_blob(Digest.parse(digest)).result is None
    peer = node.peers()[B]
    assert peer["state"] == "backoff"
    assert peer["last_error"].startswith("upstream sent content with digest sha256:")
    # The retry goes to the upstream.
    node.b.hooks.clear()
    again = node.tx.get(f"/v2/alpine/blobs/{digest}")
    assert (again.body, again.complete) == (data, True)
    assert len(node.upstream.requests("GET", digest)) == 1
    assert len(node.sent_to("b.node")) == 1


def test_a_small_blob_that_fails_from_a_peer_before_its_answer_starts_is_a_502(node):
    data, digest = content_ranked(B, A)
    node.b.blobs[digest] = data[:-1] + bytes([data[-1] ^ 1])
    response = node.tx.get(f"/v2/alpine/blobs/{digest}")
    assert response.status == 502
    (error,) = response.json()["errors"]
    assert error["message"].startswith(
        f"upstream registry docker.io is unavailable: {B}: upstream sent content with digest"
    )
    assert node.peers()[B]["state"] == "backoff"


def test_an_owner_that_dies_mid_stream_is_resumed_from_the_upstream(node):
    data, digest = content_ranked(B, A, size=300_000)
    node.upstream.add_blob(data)
    node.b.add_blob(data)
    held = node.b.hold_blob(digest)
    client = node.tx.client()
    client.send("GET", f"/v2/alpine/blobs/{digest}")
    held[0].write(data[:100_000])
    node.tx.pump()
    # b dies: its connection drops, and it no longer accepts any.
    node.agent.refused.add("b.node")
    held[0].channel.transport.loseConnection()
    node.tx.pump()
    response = client.response()
    assert (response.status, response.body, response.complete) == (200, data, True)
    (resumed,) = node.upstream.requests("GET", digest)
    assert resumed.headers["range"] == "bytes=100000-"
    assert node.peers()[B]["state"] == "backoff"
    assert node.tx.storage.open_blob(Digest.parse(digest)).result is not None


def test_manifests_by_digest_go_to_the_owner_and_tags_to_the_upstream(node):
    while True:
        body = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [], "n": os.urandom(4).hex()}
        ).encode()
        digest = str(Digest.of(body))
        if ranked([A, B, C], digest)[0] == B:
            break
    node.b.add_manifest("library/alpine", None, body)
    node.upstream.add_manifest("library/alpine", "3.20", body)
    by_digest = node.tx.get(f"/v2/alpine/manifests/{digest}")
    assert (by_digest.status, by_digest.body) == (200, body)
    assert [s.url for s in node.sent_to("b.node")] == [
        f"{B}/v2/docker.io/library/alpine/manifests/{digest}"
    ]
    assert node.upstream.requests("GET", f"manifests/{digest}") == []
    by_tag = node.tx.get("/v2/alpine/manifests/3.20")
    assert by_tag.status == 200
    assert len(node.sent_to("b.node")) == 1
    assert len(node.upstream.requests("GET", "manifests/3.20")) == 1
