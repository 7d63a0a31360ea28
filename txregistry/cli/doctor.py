"""
C{txregistry doctor}: the manual troubleshooting from the field, automated.

For every registry and mirror in the config it checks, separately: DNS (A
and AAAA), a TCP connection over IPv4 and over IPv6, TLS, the status of
C{/v2/}, fetching an anonymous token, and which proxy is used.  It goes the
way txregistry itself goes (the same resolver, endpoints, TLS policy and
proxy settings), prints a table and one conclusion per registry, and exits
non-zero when a registry has no usable mirror.  It works whether or not the
service is running: it talks to the upstreams, not to txregistry.  In
fleet mode it also checks each peer (L{txregistry.cli.doctor_fleet}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import URI, RedirectAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from txregistry.cli.doctor_fleet import check_peer, render_peers
from txregistry.config import Config, MirrorConfig, RegistryConfig
from txregistry.upstream.auth import TokenFetcher, parse_www_authenticate, pull_scope, token_key
from txregistry.upstream.bodies import describe_failure, discard_body, within
from txregistry.upstream.client import USER_AGENT
from txregistry.upstream.dns import ExplainingResolver, Lookup, lookup, why_no_address
from txregistry.upstream.endpoints import (
    FamilyEndpoint,
    MirrorTLSPolicy,
    UpstreamEndpoints,
    registry_agent,
)


@dataclass
class Check:
    """One check: passed (True), failed (False), or not applicable (None)."""

    ok: bool | None
    text: str


@dataclass
class MirrorReport:
    """
    @ivar lookups: what DNS found for the mirror's host, by family
        (C{"ipv4"}, C{"ipv6"}).
    """

    mirror: MirrorConfig
    checks: dict[str, Check] = field(default_factory=dict)
    proxy: str = "none"
    lookups: dict[str, Lookup] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        v2 = self.checks.get("/v2/")
        token = self.checks.get("token")
        return bool(v2 and v2.ok) and not (token and token.ok is False)

    def failed(self, name: str) -> bool:
        check = self.checks.get(name)
        return check is not None and check.ok is False

    def passed(self, name: str) -> bool:
        check = self.checks.get(name)
        return check is not None and bool(check.ok)

    def address_problem(self, family: str) -> str | None:
        """
        Why txregistry finds no address of C{family} for this mirror, in the
        words its own connections use, or L{None}.  Through a proxy, which
        resolves the name itself, there is none.
        """
        ipv4, ipv6 = self.lookups.get("ipv4"), self.lookups.get("ipv6")
        if self.proxy != "none" or ipv4 is None or ipv6 is None:
            return None
        return why_no_address(self.mirror.host, family, ipv4, ipv6)


COLUMNS = ["A", "AAAA", "IPv4 connect", "IPv6 connect", "TLS", "/v2/", "token"]


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.done.callback(None)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(reason)


async def check_mirror(
    reactor: Any, resolver: IHostnameResolver, registry: RegistryConfig, mirror: MirrorConfig
) -> MirrorReport:
    """Run every check against one mirror."""
    report = MirrorReport(mirror)
    uri = URI.fromBytes(mirror.url.encode("ascii") + b"/v2/")
    host, port, scheme = uri.host.decode("ascii"), uri.port, uri.scheme.decode("ascii")
    upstream = registry.upstream
    timeout = upstream.connect_timeout
    proxy = upstream.proxy.for_url(scheme, host)
    report.proxy = proxy.display if proxy is not None else "none"

    for name, family in (("A", "ipv4"), ("AAAA", "ipv6")):
        try:
            found = await within(timeout, reactor, lookup(resolver, host, port, family))
        except Exception as e:
            report.checks[name] = Check(False, f"failed: {describe_failure(e)}")
            continue
        report.lookups[family] = found
    resolves = any(result.addresses for result in report.lookups.values())
    for name, family in (("A", "ipv4"), ("AAAA", "ipv6")):
        result = report.lookups.get(family)
        if result is None:
            continue
        if result.addresses:
            text = f"{len(result.addresses)} found"
        else:
            # When the name does not resolve at all, the resolver's error says why.
            text = "none" if resolves else result.error or "none"
        report.checks[name] = Check(bool(result.addresses), text)

    for name, family, dns in (("IPv4 connect", "ipv4", "A"), ("IPv6 connect", "ipv6", "AAAA")):
        if not report.checks[dns].ok:
            report.checks[name] = Check(None, "-")
            continue
        endpoint = FamilyEndpoint(reactor, resolver, host, port, family, timeout)
        try:
            protocol = await endpoint.connect(Factory.forProtocol(Protocol))
            cast(Protocol, protocol).transport.loseConnection()  # type: ignore[union-attr]
            report.checks[name] = Check(True, "ok")
        except Exception as e:
            report.checks[name] = Check(False, describe_failure(e))

    family_dns = {"ipv4": ["A"], "ipv6": ["AAAA"], "any": ["A", "AAAA"]}[registry.address_family]
    if proxy is None and not any(report.checks[name].ok for name in family_dns):
        # Without an address there is nothing more to try (a proxy would
        # resolve the name itself).
        for name in ("TLS", "/v2/", "token"):
            report.checks[name] = Check(None, "-")
        return report

    tls = MirrorTLSPolicy.for_registry(registry)
    endpoints = UpstreamEndpoints(
        reactor, resolver, registry.address_family, timeout, tls, upstream.proxy
    )
    if scheme == "https":
        handshake = _Handshake()
        try:
            await endpoints.endpointForURI(uri).connect(Factory.forProtocol(lambda: handshake))
            await within(upstream.response_timeout, reactor, handshake.done)
            report.checks["TLS"] = Check(True, "insecure" if registry.insecure else "verified")
        except Exception as e:
            report.checks["TLS"] = Check(False, describe_failure(e))
    else:
        report.checks["TLS"] = Check(None, "-")

    agent = RedirectAgent(registry_agent(reactor, resolver, registry))
    await _v2_and_token(reactor, agent, registry, mirror, report)
    return report


async def _v2_and_token(
    reactor: Any,
    agent: IAgent,
    registry: RegistryConfig,
    mirror: MirrorConfig,
    report: MirrorReport,
) -> None:
    """GET /v2/ as txregistry would, and answer its challenge anonymously."""
    timeout = registry.upstream.response_timeout
    try:
        headers = Headers({b"User-Agent": [USER_AGENT]})
        request = agent.request(b"GET", f"{mirror.url}/v2/".encode(), headers)
        response = await within(timeout, reactor, request)
    except Exception as e:
        report.checks["/v2/"] = Check(False, describe_failure(e))
        report.checks["token"] = Check(None, "-")
        return
    discard_body(response)
    report.checks["/v2/"] = Check(response.code in (200, 401), f"HTTP {response.code}")
    if response.code != 401:
        report.checks["token"] = Check(None, "not needed" if response.code == 200 else "-")
        return
    values = [v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])]
    challenges = parse_www_authenticate(values)
    bearer = next((c for c in challenges if c.scheme == "bearer"), None)
    if bearer is None:
        schemes = ", ".join(c.scheme for c in challenges) or "none"
        report.checks["token"] = Check(None, f"{schemes} auth")
        return
    scope = pull_scope("library/alpine") if registry.is_docker_hub else ""
    key = token_key(bearer, scope)
    if key is None:
        report.checks["token"] = Check(False, "unusable realm")
        return
    fetcher = TokenFetcher(agent, reactor, registry.name, timeout)
    try:
        await fetcher.token(key)
        report.checks["token"] = Check(True, "anonymous ok")
    except Exception as e:
        report.checks["token"] = Check(False, describe_failure(e))


def conclude(registry: RegistryConfig, reports: list[MirrorReport]) -> tuple[bool, str]:
    """Whether the registry has a usable mirror, and what to tell its admin."""
    usable = [r for r in reports if r.usable]
    ipv6_broken = [
        r
        for r in reports
        if r.passed("AAAA") and r.failed("IPv6 connect") and r.passed("IPv4 connect")
    ]
    if usable:
        notes = []
        if ipv6_broken and registry.address_family == "ipv4":
            notes.append("IPv6 resolves but does not connect; txregistry uses IPv4: fine")
        elif ipv6_broken:
            notes.append(
                'IPv6 resolves but does not connect: set address_family = "ipv4" for this registry'
            )
        if not any(r.mirror.resolve_tags for r in usable):
            notes.append(
                "only digest-only mirrors answer: pulls by digest work, pulls by tag do not"
            )
        if not notes:
            notes.append(f"ok: {usable[0].mirror.url} answers")
        return True, "; ".join(notes)
    problems = [r.address_problem(registry.address_family) for r in reports]
    if problems and all(problems):
        return False, " | ".join(dict.fromkeys(p for p in problems if p))
    tls_checked = [r for r in reports if r.checks["TLS"].ok is not None]
    if tls_checked and all(r.failed("TLS") for r in tls_checked):
        return False, (
            "TLS fails with every mirror: check ca_file, the system's CAs,"
            " or a TLS-intercepting proxy"
        )
    return False, "no mirror reachable: check DNS, firewall or proxy"


def render(registry: RegistryConfig, reports: list[MirrorReport], conclusion: str) -> str:
    rows = [["mirror", *COLUMNS, "proxy"]]
    for report in reports:
        mirror = report.mirror.url + ("" if report.mirror.resolve_tags else " (digest-only)")
        cells = [_cell(report.checks.get(name)) for name in COLUMNS]
        rows.append([mirror, *cells, report.proxy])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"registry {registry.name}"]
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(("  " + "  ".join(padded)).rstrip())
    lines.append(f"  conclusion: {conclusion}")
    return "\n".join(lines)


def _cell(check: Check | None) -> str:
    if check is None:
        return "-"
    mark = {True: "", False: "FAIL ", None: ""}[check.ok]
    return (mark + check.text)[:40]


async def doctor(
    reactor: Any, config: Config, out: IO[str], resolver: IHostnameResolver | None = None
) -> int:
    """Check every registry; print the table; return the exit code."""
    resolver = resolver or ExplainingResolver.for_reactor(reactor)
    exit_code = 0
    print(f"txregistry doctor: {config.source or 'built-in defaults'}", file=out)
    for registry in config.registries:
        reports = [
            await check_mirror(reactor, resolver, registry, mirror) for mirror in registry.mirrors
        ]
        usable, conclusion = conclude(registry, reports)
        if not usable:
            exit_code = 1
        print("", file=out)
        print(render(registry, reports, conclusion), file=out)
    fleet = config.fleet
    if fleet.enabled:
        assert fleet.self_url is not None
        peers = [await check_peer(reactor, resolver, config, url) for url in fleet.peers]
        if not all(peer.ok for peer in peers):
            exit_code = 1
        print("", file=out)
        print(render_peers(fleet.self_url, peers), file=out)
    if config.storage.backend == "s3" and config.storage.s3 is not None:
        from txregistry.cli.bucket_check import check_bucket

        bucket = await check_bucket(reactor, config.storage.s3)
        print("", file=out)
        print(f"storage: {'ok' if bucket.ok else 'FAILED'}: {bucket.text}", file=out)
        if not bucket.ok:
            exit_code = 1
    return exit_code
