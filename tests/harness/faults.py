"""
A TCP proxy that breaks upstream responses on purpose.

It sits between txregistry and a real distribution registry on loopback.
Each connection carries one request (the proxy asks the upstream to close
after its response), so a fault applies to exactly one response: the first
not-yet-used fault whose C{path} is in the request line.

 - C{cut}: forward C{at} bytes of the body, then abort both connections;
 - C{flip}: invert one bit of the body byte at C{at};
 - C{stall}: forward C{at} bytes of the body, then nothing more, for ever;
 - C{trickle}: forward the body C{chunk} bytes at a time, C{interval}
   seconds apart;
 - C{throttle}: forward the body at C{rate} bytes a second, the way blob
   storage limits each connection (use a large C{times} for every response);
 - C{reset}: abort the connection before sending a byte of the response;
 - C{hang}: read the request, and never answer or close.

Run as a program, it is a throttling proxy for the bench:
C{python tests/harness/faults.py --target PORT --throttle BYTES_PER_SECOND}
prints the port it listens on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol


@dataclass
class Fault:
    path: str
    kind: str
    at: int = 0
    times: int = 1
    chunk: int = 16384
    interval: float = 0.005
    rate: float = 0.0
    # Fires when a stall begins, with the bytes of the body forwarded.
    stalled: Deferred = field(default_factory=Deferred)


class _ToUpstream(Protocol):
    def __init__(self, client: _FromClient) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.response_data(data)

    def connectionLost(self, reason=None) -> None:
        self.client.upstream_closed()


class _FromClient(Protocol):
    """One connection from txregistry."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.request = b""
        self.upstream: _ToUpstream | None = None
        self.fault: Fault | None = None
        self.headers_done = False
        self.header_buffer = b""
        self.body_sent = 0
        self.dead = False

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None and b"\r\n\r\n" not in self.request:
            self.request += data
            if b"\r\n\r\n" in self.request:
                self._start()
            return
        if self.upstream is not None:
            self.upstream.transport.write(data)

    def _start(self) -> None:
        head, _, rest = self.request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.proxy.requests.append(head.decode("latin-1"))
        request_line = lines[0].decode("latin-1")
        for fault in self.proxy.faults:
            if fault.times > 0 and fault.path in request_line:
                fault.times -= 1
                self.fault = fault
                break
        if self.fault is not None and self.fault.kind == "reset":
            self.transport.abortConnection()
            return
        if self.fault is not None and self.fault.kind == "hang":
            return
        kept = [line for line in lines if not line.lower().startswith(b"connection:")]
        self.request = b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n" + rest
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.target_port)
        endpoint.connect(Factory.forProtocol(lambda: _ToUpstream(self))).addErrback(
            lambda _: self.transport.loseConnection()
        )

    def upstream_ready(self, upstream: _ToUpstream) -> None:
        self.upstream = upstream
        upstream.transport.write(self.request)

    def response_data(self, data: bytes) -> None:
        if self.dead:
            return
        if not self.headers_done:
            self.header_buffer += data
            end = self.header_buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.headers_done = True
            self.transport.write(self.header_buffer[: end + 4])
            data = self.header_buffer[end + 4 :]
        if data:
            self._body(data)

    def _body(self, data: bytes) -> None:
        fault = self.fault
        start = self.body_sent
        if fault is None:
            self._send(data)
        elif fault.kind == "cut":
            self._send(data[: max(0, fault.at - start)])
            if start + len(data) >= fault.at:
                self._die(abort=True)
        elif fault.kind == "flip":
            if start <= fault.at < start + len(data):
                i = fault.at - start
                data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
            self._send(data)
        elif fault.kind == "stall":
            self._send(data[: max(0, fault.at - start)])
            if start + len(data) >= fault.at:
                self.dead = True
                self.upstream.transport.pauseProducing()
                if not fault.stalled.called:
                    fault.stalled.callback(self.body_sent)
        elif fault.kind == "trickle":
            self.upstream.transport.pauseProducing()
            self._trickle(data)
        elif fault.kind == "throttle":
            self._throttle_buffer += data
            if len(self._throttle_buffer) > 4 * _THROTTLE_STEP:
                self.upstream.transport.pauseProducing()
            if self._throttle_started is None:
                self._throttle_started = reactor.seconds()
                self._throttle()

    _throttle_buffer = b""
    _throttle_started: float | None = None
    _throttle_sent = 0

    def _throttle(self) -> None:
        """Send what the rate allows by now, then come back when the next step is due."""
        if self.transport.disconnected:
            return
        rate = self.fault.rate
        allowed = int(rate * (reactor.seconds() - self._throttle_started)) - self._throttle_sent
        if allowed > 0 and self._throttle_buffer:
            piece = self._throttle_buffer[:allowed]
            self._throttle_buffer = self._throttle_buffer[len(piece) :]
            self._throttle_sent += len(piece)
            self._send(piece)
            if len(self._throttle_buffer) <= 4 * _THROTTLE_STEP:
                self.upstream.transport.resumeProducing()
        if not self._throttle_buffer and self._upstream_closed:
            self.transport.loseConnection()
            return
        due = (self._throttle_sent + _THROTTLE_STEP) / rate + self._throttle_started
        reactor.callLater(max(0.0, due - reactor.seconds()), self._throttle)

    def _trickle(self, data: bytes) -> None:
        if self.transport.disconnected:
            return
        piece, rest = data[: self.fault.chunk], data[self.fault.chunk :]
        self._send(piece)
        if rest:
            reactor.callLater(self.fault.interval, self._trickle, rest)
        else:
            self.upstream.transport.resumeProducing()
            if self._upstream_closed:
                self.transport.loseConnection()

    _upstream_closed = False

    def _send(self, data: bytes) -> None:
        self.body_sent += len(data)
        if data:
            self.transport.write(data)

    def _die(self, abort: bool) -> None:
        self.dead = True
        if self.upstream is not None:
            self.upstream.transport.abortConnection()
        self.transport.abortConnection()

    def upstream_closed(self) -> None:
        self._upstream_closed = True
        if self.fault is not None and self.fault.kind in ("trickle", "throttle"):
            if self.fault.kind == "throttle" and self._throttle_started is None:
                self.transport.loseConnection()  # it never had a body
            return  # closed by _trickle or _throttle once the last piece is out
        if not self.dead:
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


_THROTTLE_STEP = 64 * 1024


class FaultProxy:
    """Listens on a loopback port and forwards to C{target_port}, breaking on request."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.faults: list[Fault] = []
        self.requests: list[str] = []
        self.port = None

    async def start(self) -> FaultProxy:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(Factory.forProtocol(lambda: _FromClient(self)))
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def inject(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def requests_for(self, fragment: str) -> list[str]:
        return [r for r in self.requests if fragment in r.split("\r\n")[0]]

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()


def main() -> None:
    """A throttling proxy in a process of its own, for the bench."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="throttle each response of an upstream")
    parser.add_argument("--target", type=int, required=True, help="the upstream's port")
    parser.add_argument("--throttle", type=float, required=True, help="bytes a second")
    options = parser.parse_args()

    async def start() -> None:
        proxy = await FaultProxy(options.target).start()
        proxy.inject(Fault("", "throttle", rate=options.throttle, times=1 << 62))
        print(f"listening on {proxy.port.getHost().port}", flush=True)
        # Forget the requests: a long bench would otherwise keep them all.
        proxy.requests = _Forget()

    Deferred.fromCoroutine(start()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.run()
    sys.exit(0)


class _Forget(list):
    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    main()
