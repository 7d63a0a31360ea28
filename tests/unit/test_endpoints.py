"""
Reaching upstream hosts, in memory: one address family, one address at a
time, a connect timeout on a Clock, CONNECT tunnels and absolute-form
proxying.  What was dialled is read off the memory reactor.
"""

import base64

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from zope.interface import implementer

from txregistry.config import ConfigError, ProxyConfig, ProxyServer, Secret
from txregistry.upstream.endpoints import (
    FamilyEndpoint,
    MirrorTLSPolicy,
    TunnelEndpoint,
    UpstreamEndpoints,
    _Unverified,
    upstream_agent,
)


@implementer(IHostnameResolver)
class Resolver:
    """Answers from a table, ignoring the address-type hint, as a resolver may."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        self.asked.append((hostName, tuple(addressTypes or ())))
        receiver.resolutionBegan(None)
        for kind, host in self.answers.get(hostName, []):
            receiver.addressResolved(kind("TCP", host, portNumber))
        receiver.resolutionComplete()


BOTH = {"mirror.test": [(IPv6Address, "::1"), (IPv4Address, "127.0.0.1")]}


class Recorder(Protocol):
    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


def outcome(d):
    """What C{d} has fired with so far, leaving its result in place."""
    results = []

    def keep(result):
        results.append(result)
        return result

    d.addBoth(keep)
    if results and isinstance(results[0], Failure):
        d.addErrback(lambda _: None)
    return results[0] if results else None


def dialled(reactor):
    return [(host, port) for host, port, *_ in reactor.tcpClients]


def accept(reactor, index=-1):
    """Let the connection attempt at C{index} succeed."""
    host, port, factory, *_ = reactor.tcpClients[index]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport


def refuse(reactor, index=-1):
    factory = reactor.tcpClients[index][2]
    factory.clientConnectionFailed(reactor.connectors[index], Failure(ConnectionRefusedError()))


def test_ipv4_only_resolves_a_records_and_never_dials_ipv6():
    reactor, resolver = MemoryReactorClock(), Resolver(BOTH)
    d = FamilyEndpoint(reactor, resolver, "mirror.test", 443, "ipv4", 5).connect(
        Factory.forProtocol(Recorder)
    )
    assert resolver.asked == [("mirror.test", (IPv4Address,))]
    assert dialled(reactor) == [("127.0.0.1", 443)]
    accept(reactor)
    assert isinstance(outcome(d), Recorder)


def test_host_with_only_aaaa_records_fails_clearly():
    reactor = MemoryReactorClock()
    resolver = Resolver({"v6only.test": [(IPv6Address, "2001:db8::1")]})
    d = FamilyEndpoint(reactor, resolver, "v6only.test", 443, "ipv4", 5).connect(Factory())
    assert (
        outcome(d)
        .getErrorMessage()
        .startswith("no IPv4 address for v6only.test: it has only IPv6 (AAAA) records")
    )
    assert resolver.asked == [("v6only.test", (IPv4Address,)), ("v6only.test", (IPv6Address,))]
    assert dialled(reactor) == []


def test_ipv6_family_dials_only_ipv6():
    reactor = MemoryReactorClock()
    FamilyEndpoint(reactor, Resolver(BOTH), "mirror.test", 443, "ipv6", 5).connect(Factory())
    assert dialled(reactor) == [("::1", 443)]


def test_addresses_are_tried_one_at_a_time_in_order():
    reactor = MemoryReactorClock()
    d = FamilyEndpoint(reactor, Resolver(BOTH), "mirror.test", 80, "any", 5).connect(
        Factory.forProtocol(Recorder)
    )
    assert dialled(reactor) == [("::1", 80)]
    refuse(reactor)
    assert dialled(reactor) == [("::1", 80), ("127.0.0.1", 80)]
    refuse(reactor)
    failure = outcome(d)
    assert failure.getErrorMessage() == (
        "cannot connect to mirror.test:80: ::1: connection refused; 127.0.0.1: connection refused"
    )


def test_connect_timeout_covers_every_attempt():
    reactor = MemoryReactorClock()
    d = FamilyEndpoint(reactor, Resolver(BOTH), "mirror.test", 443, "any", 5).connect(Factory())
    reactor.advance(2)
    refuse(reactor)  # the second address gets what is left of the 5s
    assert reactor.tcpClients[-1][3] == pytest.approx(3)
    reactor.advance(2.9)
    assert outcome(d) is None
    reactor.advance(0.1)
    assert outcome(d).getErrorMessage() == "no connection to mirror.test:443 within 5s"
    assert reactor.connectors[-1].stoppedConnecting


def test_dns_failure_is_named():
    @implementer(IHostnameResolver)
    class Broken:
        def resolveHostName(self, receiver, *args, **kwargs):
            raise OSError("resolver exploded")

    d = FamilyEndpoint(MemoryReactorClock(), Broken(), "mirror.test", 443, "ipv4", 5).connect(
        Factory()
    )
    assert outcome(d).getErrorMessage() == "DNS lookup of mirror.test failed: resolver exploded"


@implementer(IStreamClientEndpoint)
class Direct:
    """An endpoint whose connection is a StringTransport, at once."""

    def __init__(self):
        self.transport = StringTransport()
        self.protocol = None

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


def test_tunnel_sends_connect_then_hands_the_connection_over():
    proxy = Direct()
    authorization = Secret("Basic " + base64.b64encode(b"me:pw").decode())
    d = TunnelEndpoint(proxy, "registry.example", 443, authorization).connect(
        Factory.forProtocol(Recorder)
    )
    assert proxy.transport.value() == (
        b"CONNECT registry.example:443 HTTP/1.1\r\nHost: registry.example:443\r\n"
        b"Proxy-Authorization: Basic bWU6cHc=\r\n\r\n"
    )
    assert outcome(d) is None
    proxy.protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\n")
    proxy.protocol.dataReceived(b"Via: test\r\n\r\nhello")
    wrapped = outcome(d)
    assert isinstance(wrapped, Recorder) and wrapped.received == b"hello"
    proxy.protocol.dataReceived(b" world")
    assert wrapped.received == b"hello world"
    assert wrapped.transport is proxy.transport


def test_tunnel_refused_by_the_proxy():
    proxy = Direct()
    d = TunnelEndpoint(proxy, "registry.example", 443, None).connect(Factory.forProtocol(Recorder))
    assert b"Proxy-Authorization" not in proxy.transport.value()
    proxy.protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    assert outcome(d).getErrorMessage() == (
        "the proxy refused CONNECT registry.example:443: HTTP/1.1 403 Forbidden"
    )
    assert proxy.transport.disconnecting


def test_https_through_the_proxy_dials_the_proxy_except_for_no_proxy_hosts():
    reactor = MemoryReactorClock()
    resolver = Resolver(
        {
            "proxy.test": [(IPv4Address, "10.0.0.9")],
            "registry.example": [(IPv4Address, "10.0.0.1")],
            "internal.example": [(IPv4Address, "10.0.0.2")],
        }
    )
    proxy = ProxyConfig(https=ProxyServer("proxy.test", 3128), no_proxy=("internal.example",))
    endpoints = UpstreamEndpoints(
        reactor, resolver, "ipv4", 5, MirrorTLSPolicy(set(), None, False), proxy
    )
    endpoints.endpointForURI(URI.fromBytes(b"https://registry.example/v2/")).connect(Factory())
    endpoints.endpointForURI(URI.fromBytes(b"https://internal.example/v2/")).connect(Factory())
    assert dialled(reactor) == [("10.0.0.9", 3128), ("10.0.0.2", 443)]


def test_plain_http_through_the_proxy_uses_absolute_form():
    reactor = MemoryReactorClock()
    resolver = Resolver({"proxy.test": [(IPv4Address, "10.0.0.9")]})
    authorization = Secret("Basic " + base64.b64encode(b"me:pw").decode())
    proxy = ProxyConfig(http=ProxyServer("proxy.test", 3128, authorization))
    agent = upstream_agent(reactor, resolver, "ipv4", 5, MirrorTLSPolicy(set(), None, False), proxy)
    agent.request(b"GET", b"http://plain.example:5000/v2/x/manifests/1", Headers())
    assert dialled(reactor) == [("10.0.0.9", 3128)]
    request = accept(reactor).value()
    assert request.startswith(b"GET http://plain.example:5000/v2/x/manifests/1 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic bWU6cHc=" in request


def test_tls_policy_by_host(tmp_path):
    policy = MirrorTLSPolicy({"insecure.example"}, None, insecure=True)
    assert isinstance(policy.creatorForNetloc(b"insecure.example", 443), _Unverified)
    assert not isinstance(policy.creatorForNetloc(b"auth.example", 443), _Unverified)


def test_ca_file_without_a_certificate_is_a_config_error(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        MirrorTLSPolicy({"registry.example"}, ca, insecure=False)
    assert "holds no PEM certificate" in str(caught.value)
