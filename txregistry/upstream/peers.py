"""
Fleet mode: the other txregistry nodes, asked for content by digest before
the upstream, so that a fleet fetches each blob from the upstream once.

Every blob (and manifest by digest) has an I{owner}: of this node and its
live peers, the one with the highest rendezvous weight for its digest
(highest random weight hashing).  Every node computes the same weights, so
every node that sees the same live peers names the same owner, and when a
peer leaves only the digests it owned move, each to its runner-up.

A node asks, in order of weight, the live peers that rank above itself for
the digest: the owner first, then, if it cannot answer, the runner-up, and
so on down to itself, when it goes to the upstream.  Asking only peers that
rank higher makes loops impossible: every request between peers goes up the
ranking, and a request marked with L{PEER_HEADER} is never passed on to
another peer at all: its receiver fetches from the upstream itself (or
joins a download already under way there).  A peer is asked as a
digest-only mirror: what it sends is checked against the digest, so a peer
can make a pull slower but never wrong.

A peer that does not answer (no connection, no response in time, content
that fails its digest) backs off as a mirror does, but from its first
failure: a node that has gone is skipped at once, and the digests it owned
are fetched by their runners-up.  An HTTP answer that is not a success (the
owner's upstream said 502 or 404) leaves the peer in good standing: the
node then asks the next peer or the upstream itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from txregistry.config import FleetConfig, MirrorConfig, UpstreamConfig
from txregistry.oci.reference import Digest
from txregistry.upstream.mirrors import MirrorState, Outcome

# Marks a request from one node to another; its value is the sender's URL.
PEER_HEADER = b"Txregistry-Peer"


def weight(peer: str, digest: Digest | str) -> int:
    """A peer's rendezvous weight for a digest: the same on every node."""
    hashed = hashlib.sha256(f"{peer}\n{digest}".encode()).digest()
    return int.from_bytes(hashed[:8], "big")


def ranked(peers: Iterable[str], digest: Digest | str) -> list[str]:
    """Peers by their weight for C{digest}, the owner first."""
    return sorted(peers, key=lambda peer: (weight(peer, digest), peer), reverse=True)


class Fleet:
    """This node's view of its peers: who owns what, and how each is doing."""

    def __init__(
        self, config: FleetConfig, clock: IReactorTime, timing: UpstreamConfig | None = None
    ) -> None:
        assert config.self_url is not None
        self.self_url = config.self_url
        self._clock = clock
        timing = timing or config.timing
        self.states = [
            MirrorState(
                MirrorConfig(url, resolve_tags=False),
                timing.backoff_initial,
                timing.backoff_max,
                failures_before_backoff=1,
            )
            for url in config.peers
        ]
        self._by_url = {state.mirror.url: state for state in self.states}

    def is_peer(self, url: str | None) -> bool:
        return url in self._by_url

    def live(self) -> list[MirrorState]:
        now = self._clock.seconds()
        return [state for state in self.states if not state.backing_off(now)]

    def owner(self, digest: Digest | str) -> str:
        """The URL of the node that owns C{digest}, as this node sees the fleet."""
        return ranked([self.self_url, *(s.mirror.url for s in self.live())], digest)[0]

    def to_ask(self, digest: Digest | str) -> list[MirrorState]:
        """
        The live peers that rank above this node for C{digest}, owner
        first: empty when this node is the owner.
        """
        mine = (weight(self.self_url, digest), self.self_url)
        above = [s for s in self.live() if (weight(s.mirror.url, digest), s.mirror.url) > mine]
        order = ranked((s.mirror.url for s in above), digest)
        return [self._by_url[url] for url in order]

    def record(self, state: MirrorState, outcome: Outcome | None) -> None:
        """
        Note how a peer did: L{None} for a success.  Only no answer at all
        backs it off; any failure but a 404 counts in C{failures_total}.
        """
        state.requests += 1
        if outcome is None:
            state.answered()
            return
        if outcome.status != 404:
            state.failures_total += 1
        if outcome.status is None:
            state.failed(self._clock.seconds(), outcome.reason)
        else:
            state.answered()

    def content_failed(self, url: str, reason: str) -> None:
        """A peer sent a blob that failed its digest check: skip it for a while."""
        state = self._by_url.get(url)
        if state is not None:
            state.failures_total += 1
            state.failed(self._clock.seconds(), reason)

    def describe(self) -> dict[str, Any]:
        """The fleet for C{/health}: this node and each peer's state."""
        now = self._clock.seconds()
        peers = []
        for state in self.states:
            description = state.describe(now)
            del description["resolve_tags"]
            peers.append(description)
        return {"self": self.self_url, "peers": peers}
