"""
How txregistry connects to upstream hosts.

The incident this module exists for: a VM whose DNS answered AAAA records
but which had no IPv6 route, so pulls died with 502.  Upstream hosts are
resolved for one address family only (A records, by default) and connected
to with a plain TCP endpoint of that family, one address at a time.  There
is no racing between families (no L{HostnameEndpoint}).  A host without an
address of the family fails saying which case it is (see
L{txregistry.upstream.dns}): the name does not resolve, or it has only
addresses of the other family.

HTTPS upstreams behind an HTTP proxy are reached through a CONNECT tunnel,
with TLS verified end to end; L{UpstreamEndpoints} builds each connection
from these parts for Twisted's L{Agent}.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    ProxyAgent,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from txregistry.config import (
    ConfigError,
    FleetConfig,
    ProxyConfig,
    ProxyServer,
    RegistryConfig,
    Secret,
)
from txregistry.pem import certificate_blocks
from txregistry.reactors import IConnectingReactor
from txregistry.sockets import read_in_large_pieces
from txregistry.upstream.bodies import TimedOut, within
from txregistry.upstream.dns import Lookup, lookup, why_no_address

_MINIMUM_TLS = TLSVersion.TLSv1_2


class UpstreamConnectError(ConnectError):
    """A connection to an upstream host failed; the message says why, plainly."""

    def __init__(self, message: str) -> None:
        super().__init__(string=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@implementer(IStreamClientEndpoint)
class FamilyEndpoint:
    """
    Connects to C{host:port} over one address family: resolves, then tries
    the addresses in the order the resolver gave, one at a time, all within
    C{timeout} seconds.
    """

    def __init__(
        self,
        reactor: IConnectingReactor,
        resolver: IHostnameResolver,
        host: str,
        port: int,
        family: str,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._family = family
        self._timeout = timeout

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect_in_time(factory))

    async def _connect_in_time(self, factory: IProtocolFactory) -> IProtocol:
        try:
            return await within(
                self._timeout, self._reactor, Deferred.fromCoroutine(self._connect(factory))
            )
        except TimedOut:
            raise UpstreamConnectError(
                f"no connection to {self._host}:{self._port} within {self._timeout:g}s"
            ) from None

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        clock = self._reactor
        deadline = clock.seconds() + self._timeout
        try:
            found = await lookup(self._resolver, self._host, self._port, self._family)
            addresses = found.addresses
            if not addresses:
                raise UpstreamConnectError(await self._why_no_address(found))
        except UpstreamConnectError:
            raise
        except Exception as e:
            raise UpstreamConnectError(f"DNS lookup of {self._host} failed: {e}") from None
        errors = []
        for address in addresses:
            assert isinstance(address, (IPv4Address, IPv6Address))
            endpoint_type = (
                TCP6ClientEndpoint if isinstance(address, IPv6Address) else TCP4ClientEndpoint
            )
            endpoint = endpoint_type(
                self._reactor,
                address.host,
                self._port,
                timeout=max(deadline - clock.seconds(), 0.001),
            )
            try:
                protocol: IProtocol = await endpoint.connect(factory)
                read_in_large_pieces(getattr(protocol, "transport", None))
                return protocol
            except (defer.CancelledError, ConnectingCancelledError):
                # We were cancelled, by our timeout or our caller: stop.
                raise
            except Exception as e:
                errors.append(f"{address.host}: {_reason(e)}")
        raise UpstreamConnectError(
            f"cannot connect to {self._host}:{self._port}: {'; '.join(errors)}"
        )

    async def _why_no_address(self, found: Lookup) -> str:
        """
        Why the host has no address of our family: the other family is
        looked up too, to tell a name that does not resolve from one that
        has only addresses of the other family.
        """
        ipv4 = ipv6 = found
        if self._family == "ipv4":
            ipv6 = await lookup(self._resolver, self._host, self._port, "ipv6")
        elif self._family == "ipv6":
            ipv4 = await lookup(self._resolver, self._host, self._port, "ipv4")
        why = why_no_address(self._host, self._family, ipv4, ipv6)
        assert why is not None
        return why


def _reason(error: Exception) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (TCPTimedOutError, TimeoutError)):
        return "timed out"
    return str(error).strip() or type(error).__name__


class _TunnelProtocol(Protocol):
    """
    Asks an HTTP proxy to CONNECT to a host, then becomes a pipe to the
    protocol that wants to talk to that host.
    """

    def __init__(
        self, factory: IProtocolFactory, target: str, authorization: Secret | None
    ) -> None:
        self._factory = factory
        self._target = target
        self._authorization = authorization
        self._buffer = b""
        self._wrapped: IProtocol | None = None
        self.established: Deferred[IProtocol] = Deferred()

    def connectionMade(self) -> None:
        request = [f"CONNECT {self._target} HTTP/1.1", f"Host: {self._target}"]
        if self._authorization is not None:
            request.append(f"Proxy-Authorization: {self._authorization.reveal()}")
        assert self.transport is not None
        self.transport.write(("\r\n".join(request) + "\r\n\r\n").encode("latin-1"))

    def dataReceived(self, data: bytes) -> None:
        if self._wrapped is not None:
            self._wrapped.dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > 16384:
                self._refuse("the proxy's answer to CONNECT is too long")
            return
        status_line = self._buffer.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        rest = self._buffer[end + 4 :]
        self._buffer = b""
        if re.fullmatch(r"HTTP/1\.[01] 2\d\d.*", status_line) is None:
            self._refuse(f"the proxy refused CONNECT {self._target}: {status_line[:100]}")
            return
        assert self.transport is not None
        wrapped = self._factory.buildProtocol(self.transport.getPeer())
        assert wrapped is not None
        self._wrapped = wrapped
        wrapped.makeConnection(self.transport)
        self.established.callback(wrapped)
        if rest:
            wrapped.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        self.established.errback(UpstreamConnectError(why))
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._wrapped is not None:
            self._wrapped.connectionLost(reason)
        elif not self.established.called:
            self.established.errback(
                UpstreamConnectError(
                    f"the proxy closed the connection before CONNECT {self._target}"
                )
            )


def quiet_factory(protocol: Callable[[], Protocol]) -> Factory[Protocol]:
    """
    A factory for one outgoing connection that does not log its start and
    stop (Twisted's C{Starting factory} lines say nothing the access and
    mirror lines do not; U{https://github.com/twisted/twisted/issues/9330}).
    """
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    return factory


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """The pool's factory for each upstream connection, without its two log lines."""

    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """
    A connection pool whose connections are not announced in the log: Twisted's
    logs C{Starting factory _HTTP11ClientFactory(...)} and C{Stopping factory}
    at INFO for every connection it opens and closes
    (U{https://github.com/twisted/twisted/issues/9330}).  Twisted's own tests
    replace C{_factory} the same way.
    """

    _factory = _QuietHTTP11ClientFactory


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Reaches C{host:port} through an HTTP proxy's CONNECT method (RFC 9110 9.3.6)."""

    def __init__(
        self, proxy: IStreamClientEndpoint, host: str, port: int, authorization: Secret | None
    ) -> None:
        self._proxy = proxy
        self._target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._authorization = authorization

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        tunnel = _TunnelProtocol(factory, self._target, self._authorization)
        connected = self._proxy.connect(quiet_factory(lambda: tunnel))
        return connected.addCallback(lambda _: tunnel.established)


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without certificate verification, for C{insecure = true}; SNI is still sent."""

    def __init__(self, hostname: str) -> None:
        self._options = CertificateOptions(verify=False, raiseMinimumTo=_MINIMUM_TLS)
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if not re.fullmatch(r"[\d.]+|.*:.*", self._hostname):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


def load_ca_file(path: Path) -> Any:
    """The certificates of a PEM file, as a trust root."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"ca_file {str(path)!r}", f"cannot read it: {e.strerror}") from None
    blocks = certificate_blocks(text)
    if not blocks:
        raise ConfigError(f"ca_file {str(path)!r}", "holds no PEM certificate")
    try:
        return trustRootFromCertificates(
            [Certificate.loadPEM(block.encode("ascii")) for block in blocks]
        )
    except Exception as e:
        raise ConfigError(f"ca_file {str(path)!r}", f"holds an invalid certificate: {e}") from None


@implementer(IPolicyForHTTPS)
class MirrorTLSPolicy:
    """
    How TLS connections are verified for one registry: its mirrors' hosts
    against C{ca_file} (or not at all, if C{insecure}); every other host
    (token services, blob storage) against the system's CAs.  TLS 1.2 at
    least, always.
    """

    def __init__(self, mirror_hosts: Iterable[str], ca_file: Path | None, insecure: bool) -> None:
        self._mirror_hosts = set(mirror_hosts)
        self._insecure = insecure
        self._trust = load_ca_file(ca_file) if ca_file is not None else None

    @classmethod
    def for_registry(cls, registry: RegistryConfig) -> MirrorTLSPolicy:
        """
        @raise ConfigError: C{ca_file} holds no certificate.
        """
        return cls({m.host for m in registry.mirrors}, registry.ca_file, registry.insecure)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii")
        extra = {"raiseMinimumTo": _MINIMUM_TLS}
        if host in self._mirror_hosts:
            if self._insecure:
                return _Unverified(host)
            if self._trust is not None:
                return optionsForClientTLS(
                    host, trustRoot=self._trust, extraCertificateOptions=extra
                )
        return optionsForClientTLS(host, extraCertificateOptions=extra)


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """
    The endpoints a registry's L{Agent} connects with: one address family,
    a connect timeout, TLS by the registry's policy, and CONNECT tunnels
    through its HTTPS proxy.  (Plain-HTTP proxying needs absolute-form
    requests, which L{txregistry.upstream.client} does with L{ProxyAgent}.)
    """

    def __init__(
        self,
        reactor: IConnectingReactor,
        resolver: IHostnameResolver,
        family: str,
        connect_timeout: float,
        tls: IPolicyForHTTPS,
        proxy: ProxyConfig,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._family = family
        self._timeout = connect_timeout
        self._tls = tls
        self._proxy = proxy

    def direct(self, host: str, port: int) -> IStreamClientEndpoint:
        return FamilyEndpoint(
            self._reactor, self._resolver, host, port, self._family, self._timeout
        )

    def to_proxy(self, proxy: ProxyServer) -> IStreamClientEndpoint:
        return self.direct(proxy.host, proxy.port)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if uri.scheme == b"https":
            proxy = self._proxy.for_url("https", host)
            if proxy is not None:
                endpoint = TunnelEndpoint(self.to_proxy(proxy), host, uri.port, proxy.authorization)
            else:
                endpoint = self.direct(host, uri.port)
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        if uri.scheme == b"http":
            return self.direct(host, uri.port)
        raise ValueError(f"unsupported scheme {uri.scheme!r}")


@implementer(IAgent)
class _PlainProxyRouting:
    """
    Sends C{http://} requests that the proxy settings cover to the proxy,
    in absolute form (Twisted's L{ProxyAgent}), and everything else to the
    direct agent.
    """

    def __init__(
        self,
        direct: IAgent,
        endpoints: UpstreamEndpoints,
        reactor: IConnectingReactor,
        pool: HTTPConnectionPool,
        proxy: ProxyConfig,
    ) -> None:
        self._direct = direct
        self._endpoints = endpoints
        self._reactor = reactor
        self._pool = pool
        self._proxy = proxy
        self._agents: dict[ProxyServer, IAgent] = {}

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[IResponse]:
        parsed = URI.fromBytes(uri)
        proxy = (
            self._proxy.for_url("http", parsed.host.decode("ascii"))
            if parsed.scheme == b"http"
            else None
        )
        if proxy is None:
            return self._direct.request(method, uri, headers, bodyProducer)
        agent = self._agents.get(proxy)
        if agent is None:
            agent = self._agents[proxy] = ProxyAgent(
                self._endpoints.to_proxy(proxy), self._reactor, self._pool
            )
        if proxy.authorization is not None:
            headers = headers.copy() if headers is not None else Headers()
            headers.setRawHeaders(
                b"Proxy-Authorization", [proxy.authorization.reveal().encode("latin-1")]
            )
        return agent.request(method, uri, headers, bodyProducer)


def upstream_agent(
    reactor: IConnectingReactor,
    resolver: IHostnameResolver,
    family: str,
    connect_timeout: float,
    tls: IPolicyForHTTPS,
    proxy: ProxyConfig,
) -> IAgent:
    """
    An agent for one registry's upstream requests, with a persistent
    connection pool of its own (TLS settings differ between registries, so
    their connections must not be shared).
    """
    pool = QuietConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    endpoints = UpstreamEndpoints(reactor, resolver, family, connect_timeout, tls, proxy)
    direct: IAgent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    if proxy.http is None:
        return direct
    return _PlainProxyRouting(direct, endpoints, reactor, pool, proxy)


def registry_agent(
    reactor: IConnectingReactor, resolver: IHostnameResolver, registry: RegistryConfig
) -> IAgent:
    """The agent for one registry's upstream requests, by its settings."""
    tls = MirrorTLSPolicy.for_registry(registry)
    upstream = registry.upstream
    return upstream_agent(
        reactor, resolver, registry.address_family, upstream.connect_timeout, tls, upstream.proxy
    )


def peer_agent(
    reactor: IConnectingReactor, resolver: IHostnameResolver, fleet: FleetConfig
) -> IAgent:
    """
    The agent for requests to fleet peers: direct connections (a peer is
    on the fleet's own network, never behind the registries' proxy), to
    whichever address family a peer's URL names, TLS verified against the
    system's CAs, with the C{[upstream]} connect timeout.
    """
    return upstream_agent(
        reactor,
        resolver,
        "any",
        fleet.timing.connect_timeout,
        MirrorTLSPolicy((), None, False),
        ProxyConfig(),
    )
