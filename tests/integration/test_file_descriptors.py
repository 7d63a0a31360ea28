"""
A flood of connections against the real C{twistd txregistry}, started with
a low file-descriptor limit: it raises its soft limit, says "out of file
descriptors" once with a count instead of a line per failed accept, and
answers again once the flood has gone.
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import time
import urllib.request

import pytest
from harness.twistd import start_in_front_of

pytestmark = pytest.mark.integration

SOFT, HARD = 64, 128
FLOOD = 400
HALF_A_REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
# Only a guard against a hang: the test waits for conditions, not for time.
DEADLINE = 60.0


def low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


def get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read()


def test_a_flood_of_connections_is_reported_once_and_survived(tmp_path):
    # /v2/ never contacts the upstream: none is needed.
    process, _, port = start_in_front_of(tmp_path, "http://127.0.0.1:9", preexec=low_limit)
    clients: list[socket.socket] = []
    try:
        process.wait_for(f"file descriptors: soft limit raised from {SOFT} to {HARD}")
        for _ in range(FLOOD):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            clients.append(client)
        for client in clients:
            try:
                client.send(HALF_A_REQUEST)
            except OSError:
                pass  # not connected yet, or turned away: it still holds its place
        line = process.wait_for(
            r"out of file descriptors: (\d+) connections could not be accepted"
            rf" \(soft limit {HARD}, (\w+) open\)"
        )
        assert int(line[1]) >= 1
    finally:
        for client in clients:
            client.close()

    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            status, body = get(port, "/v2/")
            break
        except OSError:
            # Its descriptors are freed as it sees the clients close.
            assert time.monotonic() < deadline, "txregistry did not answer after the flood"
    assert (status, body) == (200, b"{}")
    status, body = get(port, "/health")
    files = json.loads(body)["file_descriptors"]
    assert files["soft_limit"] == HARD and files["hard_limit"] == HARD
    assert files["refused_total"] >= 1 and "exhausted_seconds_ago" in files
    assert json.loads(body)["status"] == "degraded"
    status, metrics = get(port, "/metrics")
    assert b"txregistry_fd_exhaustion_total" in metrics and b"txregistry_open_fds" in metrics

    process.signal(signal.SIGTERM)
    process.wait_exit()
    text = "\n".join(process.lines)
    assert text.count("out of file descriptors") <= 2, "at most once a minute"
    assert text.count("EMFILE") == 0, "no line per failed accept"
    assert "Traceback" not in text
