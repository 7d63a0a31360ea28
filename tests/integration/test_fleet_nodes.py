"""
Fleet mode with real parts: three C{twistd txregistry} nodes on loopback,
each with a local cache of its own, in front of a real distribution
registry through the fault-injecting proxy, which counts the upstream GETs
and throttles or stalls them.
"""

from __future__ import annotations

import io
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import pytest_twisted
import treq
from harness.faults import Fault, FaultProxy
from harness.processes import Process
from harness.twistd import free_port, start_node
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone

from txregistry.cli.doctor import doctor
from txregistry.config import load_config
from txregistry.upstream.peers import ranked

pytestmark = pytest.mark.integration


@dataclass
class Node:
    url: str
    process: Process

    def blob_url(self, digest: str) -> str:
        return f"{self.url}/v2/library/faults/blobs/{digest}"


class Reader(Protocol):
    """Reads a body; C{got(n)} fires once n bytes have arrived."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: Deferred[bool] = Deferred()
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def got(self, count: int) -> Deferred[None]:
        waiting: Deferred[None] = Deferred()
        self._waiting.append((count, waiting))
        self._check()
        return waiting.addTimeout(60, reactor)

    def _check(self) -> None:
        for count, waiting in list(self._waiting):
            if len(self.data) >= count:
                self._waiting.remove((count, waiting))
                waiting.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def connectionLost(self, reason) -> None:
        self.done.callback(reason.check(ResponseDone) is not None)


async def start_get(url: str) -> tuple[int, Reader]:
    response = await treq.get(url, unbuffered=True)
    reader = Reader()
    response.deliverBody(reader)
    return response.code, reader


async def get(url: str) -> tuple[int, bytes, bool]:
    """GET a blob: its status, body, and whether it ended cleanly."""
    code, reader = await start_get(url)
    clean = await reader.done
    return code, bytes(reader.data), clean


def upstream_gets(proxy: FaultProxy, digest: str) -> int:
    return len([r for r in proxy.requests_for(f"/blobs/{digest}") if r.startswith("GET ")])


@pytest.fixture
def fleet(tmp_path, proxy) -> Iterator[list[Node]]:
    """Three nodes, each with its own cache, all fetching through C{proxy}."""
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    nodes: list[Node] = []
    try:
        for i, url in enumerate(urls):
            process = start_node(
                tmp_path / f"node{i}", int(url.rsplit(":", 1)[1]), proxy.url, url, urls
            )
            nodes.append(Node(url, process))
        yield nodes
    finally:
        for node in nodes:
            node.process.stop()


def by_rank(nodes: list[Node], digest: str) -> list[Node]:
    """The nodes in the order the fleet ranks them for C{digest}: the owner first."""
    order = ranked([n.url for n in nodes], digest)
    return sorted(nodes, key=lambda n: order.index(n.url))


async def health(node: Node) -> dict:
    response = await treq.get(f"{node.url}/health")
    return json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_eight_cold_clients_over_three_nodes_make_one_upstream_get(blob, proxy, fleet):
    digest, data = blob
    # Throttled, so that every client asks while the blob is still arriving.
    proxy.inject(Fault(f"/blobs/{digest}", "trickle", chunk=65536, interval=0.01))
    gets = [Deferred.fromCoroutine(get(fleet[i % 3].blob_url(digest))) for i in range(8)]
    results = await DeferredList(gets, fireOnOneErrback=True, consumeErrors=True)
    for _, (code, body, clean) in results:
        assert (code, clean) == (200, True)
        assert body == data
    assert upstream_gets(proxy, digest) == 1
    owner, *others = by_rank(fleet, digest)
    owner.process.wait_for(f"fetching blob library/faults@{digest} .* from {proxy.url}")
    for node in others:
        node.process.wait_for(f"fetching blob library/faults@{digest} .* from {owner.url}")
        metrics = (await (await treq.get(f"{node.url}/metrics")).content()).decode()
        assert f'txregistry_peer_fetches_total{{peer="{owner.url}"}} 1.0' in metrics
        peers = {p["url"]: p["state"] for p in (await health(node))["fleet"]["peers"]}
        assert peers == {n.url: "ok" for n in fleet if n is not node}
    # Every node now has it in its own cache.
    for node in fleet:
        response = await treq.get(node.blob_url(digest))
        assert response.headers.getRawHeaders("x-cache") == ["HIT"]
        assert await response.content() == data
    assert upstream_gets(proxy, digest) == 1


@pytest_twisted.ensureDeferred
async def test_a_late_joiner_at_another_node_streams_the_fill_in_progress(blob, proxy, fleet):
    digest, data = blob
    proxy.inject(Fault(f"/blobs/{digest}", "trickle", chunk=16384, interval=0.01))
    owner, first_node, late_node = by_rank(fleet, digest)
    code, first = await start_get(first_node.blob_url(digest))
    assert code == 200
    await first.got(256 << 10)
    assert not first.done.called, "the blob is still arriving"
    late = await get(late_node.blob_url(digest))
    assert late == (200, data, True)
    assert await first.done
    assert bytes(first.data) == data
    assert upstream_gets(proxy, digest) == 1
    late_node.process.wait_for(f"fetching blob library/faults@{digest} .* from {owner.url}")


@pytest_twisted.ensureDeferred
async def test_kill_9_of_the_owner_mid_fill(blob, proxy, fleet):
    digest, data = blob
    fault = proxy.inject(Fault(f"/blobs/{digest}", "stall", at=1_500_000))
    owner, second, third = by_rank(fleet, digest)
    started = [await start_get(node.blob_url(digest)) for node in (second, third)]
    await fault.stalled
    for code, reader in started:
        assert code == 200
        # The owner streams what it has to the other nodes, and they to
        # their clients: all of it but the last byte it has.
        await reader.got(1 << 20)
    owner.process.signal(signal.SIGKILL)
    assert owner.process.wait_exit() == -signal.SIGKILL
    for _, reader in started:
        clean = await reader.done
        # Never wrong bytes: the whole blob, or a prefix of it on an
        # aborted connection.
        assert bytes(reader.data) == data[: len(reader.data)]
        assert clean and bytes(reader.data) == data
    second.process.wait_for(f"download of {digest} from {owner.url} cut after")
    # The next owner takes over: new pulls at either node are served.
    for node in (second, third):
        assert await get(node.blob_url(digest)) == (200, data, True)
    peers = {p["url"]: p["state"] for p in (await health(third))["fleet"]["peers"]}
    assert peers[owner.url] in ("backoff", "failing")
    # One stalled GET by the dead owner, and the runner-up's own.
    assert upstream_gets(proxy, digest) <= 3


@pytest_twisted.ensureDeferred
async def test_bytes_from_a_peer_are_verified(tmp_path, blob, upstream, proxy):
    """
    Node A's peer is node B behind a fault proxy, which flips a byte of
    what B sends: A's client never gets the corrupt blob whole (its
    connection is aborted before the last byte), and A caches nothing of it.
    """
    digest, data = blob
    b_port = free_port()
    b_url = f"http://127.0.0.1:{b_port}"
    while True:
        a_url = f"http://127.0.0.1:{free_port()}"
        between = await FaultProxy(b_port).start()
        if ranked([a_url, between.url], digest)[0] == between.url:
            break
        await between.stop()
    a = b = None
    try:
        b = start_node(tmp_path / "b", b_port, upstream.url, b_url, [b_url, a_url])
        a = start_node(
            tmp_path / "a", int(a_url.rsplit(":", 1)[1]), upstream.url, a_url, [a_url, between.url]
        )
        between.inject(Fault(f"/blobs/{digest}", "flip", at=1_000_000))
        code, body, clean = await get(f"{a_url}/v2/library/faults/blobs/{digest}")
        # Never the last byte of a corrupt blob (and an abort may lose a few more).
        assert code == 200 and not clean
        assert len(body) <= len(data) - 1
        a.wait_for(f"download of {digest} failed after {len(data)} bytes")
        # A skips its peer for a while, and fetches the blob itself.
        assert await get(f"{a_url}/v2/library/faults/blobs/{digest}") == (200, data, True)
        assert len(between.requests_for(f"/blobs/{digest}")) == 1
        peers = (await treq.json_content(await treq.get(f"{a_url}/health")))["fleet"]["peers"]
        assert peers[0]["state"] == "backoff"
        assert peers[0]["last_error"].startswith("upstream sent content with digest")
    finally:
        for process in (a, b):
            if process is not None:
                process.stop()
        await between.stop()


def test_fleet_nodes_refuse_a_peer_listed_twice(tmp_path):
    from harness.twistd import twistd, write_config

    config = write_config(
        tmp_path,
        '[fleet]\nself = "http://127.0.0.1:1"\npeers = ["http://127.0.0.1:2", "http://127.0.0.1:2/"]\n',
    )
    process = twistd(tmp_path, "--config", str(config))
    assert process.wait_exit() != 0
    assert process.lines == [
        f"txregistry: config error: {config}: fleet.peers[1]:"
        " 'http://127.0.0.1:2/' is listed twice: list each peer once"
    ]


@pytest_twisted.ensureDeferred
async def test_doctor_checks_each_peer(tmp_path, proxy, fleet):
    config = load_config(str(tmp_path / "node0" / "txregistry.toml"))
    out = io.StringIO()
    assert await doctor(reactor, config, out) == 0
    text = out.getvalue()
    assert f"fleet (this node: {fleet[0].url})" in text
    assert "conclusion: ok: 2 of 2 peers answer and agree" in text
    fleet[2].process.stop()
    out = io.StringIO()
    assert await doctor(reactor, config, out) == 1
    lines = out.getvalue().splitlines()
    (ok,) = [line for line in lines if line.strip().startswith(fleet[1].url)]
    assert ok.split()[1:3] == ["HTTP", "200"]
    (down,) = [line for line in lines if line.strip().startswith(fleet[2].url)]
    port = fleet[2].url.rsplit(":", 1)[1]
    assert down.split()[1:3] == ["FAIL", "-"]
    assert down.endswith(
        f"no answer: cannot connect to 127.0.0.1:{port}: 127.0.0.1: connection refused"
    )
    assert "conclusion: 1 of 2 peers have problems" in out.getvalue()
