"""
Resolving upstream host names, and saying plainly why one has no address.

Three cases look alike from a resolver that only yields addresses, and have
different fixes: a name that does not resolve at all (a typo, or a machine
without working DNS), a name with only IPv6 (AAAA) records on an IPv4-only
registry, and a name whose addresses do not connect (the last is
L{txregistry.upstream.endpoints}' to report).  Twisted's own resolver
(L{twisted.internet._resolver.GAIResolver}) drops C{getaddrinfo}'s error and
reports no addresses, so L{ExplainingResolver} is the same resolver keeping
the error on its L{Resolution}.  Both the connections txregistry makes and
C{txregistry doctor} tell the cases apart with L{why_no_address}.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorThreads,
    IResolutionReceiver,
)
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from txregistry.storage.runner import BlockingRunner

FAMILIES: dict[str, tuple[type[IAddress], ...]] = {
    "ipv4": (IPv4Address,),
    "ipv6": (IPv6Address,),
    "any": (IPv4Address, IPv6Address),
}

GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]


@implementer(IHostResolution)
class Resolution:
    """
    One name being resolved.

    @ivar error: what the resolver said when it found no address (such as
        C{Name or service not known}), or L{None}.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: str | None = None

    def cancel(self) -> NoReturn:
        raise NotImplementedError("a getaddrinfo call cannot be cancelled")


@implementer(IHostnameResolver)
class ExplainingResolver:
    """
    C{getaddrinfo} off the reactor thread, as Twisted's default resolver
    does, except that a failure is kept as L{Resolution.error} rather than
    dropped.

    @param run: runs the blocking C{getaddrinfo} call.
    """

    def __init__(self, run: BlockingRunner, getaddrinfo: GetAddrInfo = socket.getaddrinfo) -> None:
        self._run = run
        self._getaddrinfo = getaddrinfo

    @classmethod
    def for_reactor(cls, reactor: IReactorThreads) -> ExplainingResolver:
        """Resolve in the reactor's thread pool, which is started on first use."""

        def run(f: Callable[..., Any], /, *args: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        return cls(run)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        wanted = set(addressTypes or FAMILIES["any"])
        family = socket.AF_UNSPEC
        if wanted == {IPv4Address}:
            family = socket.AF_INET
        elif wanted == {IPv6Address}:
            family = socket.AF_INET6
        kind = socket.SOCK_DGRAM if transportSemantics == "UDP" else socket.SOCK_STREAM
        resolution = Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)

        def found(results: Sequence[tuple[Any, ...]]) -> None:
            for address_family, _, _, _, sockaddr in results:
                if address_family == socket.AF_INET:
                    resolutionReceiver.addressResolved(IPv4Address("TCP", *sockaddr[:2]))
                elif address_family == socket.AF_INET6:
                    resolutionReceiver.addressResolved(IPv6Address("TCP", *sockaddr))

        def failed(failure: Any) -> None:
            error = failure.value
            resolution.error = getattr(error, "strerror", None) or str(error) or repr(error)

        looked_up = self._run(self._getaddrinfo, hostName, portNumber, family, kind)
        looked_up.addCallback(found).addErrback(failed)
        looked_up.addCallback(lambda _: resolutionReceiver.resolutionComplete())
        return resolution


@dataclass(frozen=True)
class Lookup:
    """
    What resolving a host in one family found.

    @ivar error: the resolver's error, if it gave one and no address.
    """

    addresses: tuple[IAddress, ...]
    error: str | None = None


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self, types: tuple[type[IAddress], ...]) -> None:
        self._types = types
        # Typed loosely: a resolver may hand us any resolution, or None.
        self._resolution: object = None
        self._addresses: list[IAddress] = []
        self.done: Deferred[Lookup] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self._resolution = resolution

    def addressResolved(self, address: IAddress) -> None:
        # A resolver is free to ignore the family asked for.
        if isinstance(address, self._types):
            self._addresses.append(address)

    def resolutionComplete(self) -> None:
        error = None
        if not self._addresses and isinstance(self._resolution, Resolution):
            error = self._resolution.error
        self.done.callback(Lookup(tuple(self._addresses), error))


def lookup(resolver: IHostnameResolver, host: str, port: int, family: str) -> Deferred[Lookup]:
    """
    The addresses of C{host} in one family (C{"ipv4"}, C{"ipv6"} or
    C{"any"}): the resolver is asked for that family only, and its answers
    are filtered too.
    """
    types = FAMILIES[family]
    receiver = _Collect(types)
    resolver.resolveHostName(receiver, host, port, addressTypes=types)
    return receiver.done


def why_no_address(host: str, family: str, ipv4: Lookup, ipv6: Lookup) -> str | None:
    """
    L{None} if C{host} has an address of C{family}; otherwise what is
    wrong, and what to do, from its IPv4 and IPv6 lookups.
    """
    if (ipv4.addresses and family != "ipv6") or (ipv6.addresses and family != "ipv4"):
        return None
    if family == "ipv4" and ipv6.addresses:
        return (
            f"no IPv4 address for {host}: it has only IPv6 (AAAA) records; fix its DNS,"
            ' or set address_family = "any" for this registry if this machine has an IPv6 route'
        )
    if family == "ipv6" and ipv4.addresses:
        return (
            f"no IPv6 address for {host}: it has only IPv4 (A) records;"
            ' set address_family = "ipv4" or "any" for this registry'
        )
    error = ipv4.error or ipv6.error or "no address found"
    return f"cannot resolve {host}: {error}; check the name, and this machine's DNS"
