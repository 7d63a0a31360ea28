"""
Why a host has no address, in memory: the three cases that used to read
alike ("no IPv4 address for registry-1.docker.io", with a lead to
address_family = "any" that fits only one of them), told apart the same
way by txregistry's connections and by doctor.  getaddrinfo is a table
here; no real DNS is asked.
"""

import socket

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from txregistry.cli.doctor import check_mirror, conclude
from txregistry.config import MirrorConfig, RegistryConfig
from txregistry.storage.runner import run_inline
from txregistry.upstream.dns import ExplainingResolver, Lookup, lookup, why_no_address
from txregistry.upstream.endpoints import FamilyEndpoint

NONAME = "Name or service not known"
NODATA = "No address associated with hostname"


class GetAddrInfo:
    """getaddrinfo over a table of names, failing as glibc's does."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def __call__(self, host, port, family=0, kind=0):
        self.asked.append((host, port, family, kind))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, NONAME)
        results = [
            (address_family, kind, 6, "", (address, port, 0, 0)[: 2 if ":" not in address else 4])
            for address in self.table[host]
            for address_family in [socket.AF_INET6 if ":" in address else socket.AF_INET]
            if family in (socket.AF_UNSPEC, address_family)
        ]
        if not results:
            raise socket.gaierror(socket.EAI_NODATA, NODATA)
        return results


TABLE = {
    "mirror.test": ["192.0.2.1", "2001:db8::1"],
    "v6only.test": ["2001:db8::2"],
    "v4only.test": ["192.0.2.3"],
}


def resolver(table=TABLE):
    getaddrinfo = GetAddrInfo(table)
    return ExplainingResolver(run_inline, getaddrinfo), getaddrinfo


def failure_of(d):
    failures = []
    d.addErrback(failures.append)
    assert failures, "expected the connection to fail"
    return failures[0].getErrorMessage()


def connect(host, family, table=TABLE):
    reactor = MemoryReactorClock()
    explaining, getaddrinfo = resolver(table)
    d = FamilyEndpoint(reactor, explaining, host, 443, family, 5).connect(Factory())
    return reactor, d, getaddrinfo


def test_a_name_that_does_not_resolve_says_so_with_the_resolvers_error():
    reactor, d, _ = connect("nonexistent.invalid", "ipv4")
    message = failure_of(d)
    assert message == (
        f"cannot resolve nonexistent.invalid: {NONAME}; check the name, and this machine's DNS"
    )
    assert "address_family" not in message
    assert reactor.tcpClients == []


def test_a_name_with_only_aaaa_records_on_an_ipv4_registry():
    reactor, d, getaddrinfo = connect("v6only.test", "ipv4")
    assert failure_of(d) == (
        "no IPv4 address for v6only.test: it has only IPv6 (AAAA) records; fix its DNS,"
        ' or set address_family = "any" for this registry if this machine has an IPv6 route'
    )
    # A records asked for first; AAAA only to tell the cases apart.
    assert [family for *_, family, _ in getaddrinfo.asked] == [socket.AF_INET, socket.AF_INET6]
    assert reactor.tcpClients == []


def test_a_name_with_only_a_records_on_an_ipv6_registry():
    _, d, _ = connect("v4only.test", "ipv6")
    assert failure_of(d).startswith("no IPv6 address for v4only.test: it has only IPv4 (A) records")


def test_a_records_that_do_not_connect_are_a_third_case():
    reactor, d, getaddrinfo = connect("mirror.test", "ipv4")
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("192.0.2.1", 443)]
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert failure_of(d) == "cannot connect to mirror.test:443: 192.0.2.1: connection refused"
    assert len(getaddrinfo.asked) == 1


def test_the_resolver_asks_getaddrinfo_for_one_family_and_yields_twisted_addresses():
    explaining, getaddrinfo = resolver()
    for family, expected in (
        ("ipv4", (IPv4Address("TCP", "192.0.2.1", 443),)),
        ("ipv6", (IPv6Address("TCP", "2001:db8::1", 443),)),
        (
            "any",
            (IPv4Address("TCP", "192.0.2.1", 443), IPv6Address("TCP", "2001:db8::1", 443)),
        ),
    ):
        found = []
        lookup(explaining, "mirror.test", 443, family).addCallback(found.append)
        assert found == [Lookup(expected)]
    assert [(family, kind) for *_, family, kind in getaddrinfo.asked] == [
        (socket.AF_INET, socket.SOCK_STREAM),
        (socket.AF_INET6, socket.SOCK_STREAM),
        (socket.AF_UNSPEC, socket.SOCK_STREAM),
    ]


def test_the_service_resolver_runs_getaddrinfo_in_the_reactors_thread_pool():
    class Pool:
        def __init__(self):
            self.calls = []

        def callInThreadWithCallback(self, on_result, f, *args):
            self.calls.append((on_result, f, args))

    class Reactor:
        def __init__(self):
            self.pool = Pool()

        def getThreadPool(self):
            return self.pool

        def callFromThread(self, f, *args):
            f(*args)

    reactor = Reactor()
    explaining = ExplainingResolver.for_reactor(reactor)
    found = []
    lookup(explaining, "mirror.test", 443, "ipv4").addCallback(found.append)
    ((on_result, f, args),) = reactor.pool.calls
    assert f is socket.getaddrinfo and args == (
        "mirror.test",
        443,
        socket.AF_INET,
        socket.SOCK_STREAM,
    )
    assert found == []
    on_result(False, socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert found == [Lookup((), "Temporary failure in name resolution")]


def test_a_resolver_that_keeps_no_error_still_gives_a_clear_message():
    assert why_no_address("gone.test", "ipv4", Lookup(()), Lookup(())) == (
        "cannot resolve gone.test: no address found; check the name, and this machine's DNS"
    )
    assert why_no_address("mirror.test", "any", Lookup(()), Lookup((object(),))) is None


def test_doctor_says_the_same_as_txregistry():
    explaining, _ = resolver()
    registry = RegistryConfig("docker.io", (MirrorConfig("https://nonexistent.invalid"),))
    done = []
    Deferred.fromCoroutine(
        check_mirror(MemoryReactorClock(), explaining, registry, registry.mirrors[0])
    ).addCallback(done.append)
    (report,) = done
    assert report.checks["A"].ok is False and report.checks["A"].text == NONAME
    usable, conclusion = conclude(registry, [report])
    assert not usable
    assert conclusion == (
        f"cannot resolve nonexistent.invalid: {NONAME}; check the name, and this machine's DNS"
    )


def test_doctor_on_a_host_with_only_aaaa_records():
    explaining, _ = resolver()
    registry = RegistryConfig("docker.io", (MirrorConfig("https://v6only.test"),))
    reactor = MemoryReactorClock()
    done = []
    Deferred.fromCoroutine(
        check_mirror(reactor, explaining, registry, registry.mirrors[0])
    ).addCallback(done.append)
    reactor.advance(5)  # the IPv6 connection attempt times out
    (report,) = done
    assert (report.checks["A"].text, report.checks["AAAA"].text) == ("none", "1 found")
    conclusion = conclude(registry, [report])[1]
    assert conclusion.startswith("no IPv4 address for v6only.test: it has only IPv6 (AAAA)")
