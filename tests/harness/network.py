"""Controlling and observing how txregistry reaches hosts, with real sockets."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver
from zope.interface import implementer

from harness.processes import Process


@implementer(IHostnameResolver)
class TableResolver:
    """
    Answers for the names in its table, all of them, ignoring the address
    families asked for (as a resolver may); other names go to C{fallback}.
    """

    def __init__(self, answers: dict[str, list[str]], fallback: IHostnameResolver) -> None:
        self.answers = answers
        self.fallback = fallback

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        if hostName not in self.answers:
            return self.fallback.resolveHostName(
                receiver, hostName, portNumber, addressTypes, transportSemantics
            )
        receiver.resolutionBegan(None)
        for host in self.answers[hostName]:
            kind = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(kind("TCP", host, portNumber))
        receiver.resolutionComplete()
        return None


class RecordingReactor:
    """The real reactor, noting the host of every outgoing TCP connection."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.dialled: list[str] = []

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        self.dialled.append(host)
        return self._reactor.connectTCP(host, port, factory, timeout, bindAddress)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def free_port() -> int:
    """A loopback port nothing listens on, for programs that need a fixed one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TinyProxy:
    """tinyproxy (Debian's) on loopback, with its log of requests."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = directory / "tinyproxy.conf"
        config.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 600\nLogLevel Connect\n"
            "MaxClients 100\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
        )
        self.process = Process(
            ["tinyproxy", "-d", "-c", str(config)], log=directory / "tinyproxy.log"
        )
        self.process.wait_for("Reloading config file finished")
        self.url = f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines it received: C{CONNECT host:port ...}, C{GET http://...}."""
        marker = "Request (file descriptor"
        return [line.split("): ", 1)[1] for line in self.process.lines if marker in line]

    def stop(self) -> None:
        self.process.stop()
