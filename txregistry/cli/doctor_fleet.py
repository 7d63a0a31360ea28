"""
C{txregistry doctor}'s fleet checks: each peer in C{[fleet] peers}.

A peer is asked for C{/health} over the connections txregistry uses for
peers (direct, the C{[upstream]} connect and response timeouts), and its
answer is compared with this node's config, because a fleet only works
when the nodes agree:

 - the peer must answer at all;
 - the URL the peer calls itself (its C{self}) must be the one this node
   lists for it: rendezvous weights are computed from the URLs, so two
   spellings of one node give two different owners;
 - it must list this node among its peers, or it does not recognise this
   node's requests as a peer's and may pass them on;
 - it must configure every registry this node does, since a peer is asked
   for C{/v2/<registry name>/...}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IHostnameResolver
from twisted.web.http_headers import Headers

from txregistry.config import Config
from txregistry.upstream.bodies import describe_failure, read_body, within
from txregistry.upstream.client import USER_AGENT
from txregistry.upstream.endpoints import peer_agent

MAX_HEALTH = 1 << 20


@dataclass
class PeerReport:
    """What one peer said, and what is wrong with it (empty when nothing is)."""

    url: str
    health: str
    version: str = "-"
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


async def check_peer(
    reactor: Any, resolver: IHostnameResolver, config: Config, url: str
) -> PeerReport:
    fleet = config.fleet
    timing = fleet.timing
    agent = peer_agent(reactor, resolver, fleet)
    try:
        headers = Headers({b"User-Agent": [USER_AGENT]})
        request = agent.request(b"GET", f"{url}/health".encode("ascii"), headers)
        response = await within(timing.response_timeout, reactor, request)
        body = await within(timing.response_timeout, reactor, read_body(response, MAX_HEALTH))
    except Exception as e:
        why = describe_failure(e)
        return PeerReport(url, "FAIL", problems=(f"no answer: {why}",))
    if response.code != 200:
        return PeerReport(url, f"HTTP {response.code}", problems=(f"/health is {response.code}",))
    try:
        document = json.loads(body)
        assert isinstance(document, dict)
    except Exception:
        return PeerReport(url, "HTTP 200", problems=("/health is not txregistry's JSON",))
    version = str(document.get("version", "?"))
    return PeerReport(url, "HTTP 200", version, tuple(disagreements(config, url, document)))


def disagreements(config: Config, url: str, document: dict[str, Any]) -> list[str]:
    """Where a peer's C{/health} disagrees with this node's config."""
    fleet = config.fleet
    problems = []
    peer_fleet = document.get("fleet")
    if not isinstance(peer_fleet, dict):
        problems.append("it is not in fleet mode: give it the same [fleet] peers")
    else:
        if peer_fleet.get("self") != url:
            problems.append(
                f"it calls itself {peer_fleet.get('self')!r}: use one URL for it on every node"
            )
        listed = [p.get("url") for p in peer_fleet.get("peers", []) if isinstance(p, dict)]
        if fleet.self_url not in listed:
            problems.append(f"it does not list this node ({fleet.self_url}) among its peers")
    registries = document.get("registries")
    missing = [r.name for r in config.registries if r.name not in (registries or {})]
    if missing:
        problems.append(f"it does not configure registry {', '.join(missing)}")
    return problems


def render_peers(self_url: str, reports: list[PeerReport]) -> str:
    rows = [["peer", "/health", "version", "problems"]]
    for report in reports:
        rows.append([report.url, report.health, report.version, "; ".join(report.problems)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"fleet (this node: {self_url})"]
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(("  " + "  ".join(padded)).rstrip())
    failing = [r for r in reports if not r.ok]
    if not failing:
        conclusion = f"ok: {len(reports)} of {len(reports)} peers answer and agree"
    else:
        conclusion = (
            f"{len(failing)} of {len(reports)} peers have problems: this node fetches what"
            " they own from the upstream itself, or from the next peer; fix what each line says"
        )
    lines.append(f"  conclusion: {conclusion}")
    return "\n".join(lines)
