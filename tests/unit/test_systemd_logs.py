"""sd_notify, and the JSON and journal log formats."""

import io
import json
import os
import socket
import struct

import pytest
from twisted.logger import Logger, LogLevel

from txregistry.ops.logs import JournalObserver, JSONLinesObserver, choose_observer
from txregistry.ops.systemd import notify


@pytest.fixture
def datagrams(tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    receiver.bind(path)
    receiver.settimeout(5)  # a hang guard, not a measurement
    yield path, receiver
    receiver.close()


def test_notify_sends_one_datagram(datagrams):
    path, receiver = datagrams
    assert notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": path})
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_to_an_abstract_socket():
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"txregistry-test-{os.getpid()}"
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert receiver.recv(4096) == b"STOPPING=1"
    finally:
        receiver.close()


def test_without_notify_socket_nothing_is_sent():
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/socket"}) is False


def emit(observer, **fields):
    log = Logger(namespace="txregistry.test", observer=observer)
    log.warn("Mirror request failed: {mirror} {what}: {reason}", **fields)


def test_json_lines_keep_fields():
    stream = io.StringIO()
    emit(JSONLinesObserver(stream), mirror="https://a.test", what="blob x", reason="timed out")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "warn" and record["namespace"] == "txregistry.test"
    assert record["message"] == "Mirror request failed: https://a.test blob x: timed out"
    assert (record["mirror"], record["reason"]) == ("https://a.test", "timed out")
    assert record["time"].endswith("+00:00")


def parse_journal(data):
    fields, rest = {}, data
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
        else:
            (size,) = struct.unpack("<Q", after[:8])
            fields[line.decode()] = after[8 : 8 + size].decode()
            rest = after[8 + size + 1 :]
    return fields


def test_journal_entries_carry_priority_and_fields(datagrams):
    path, receiver = datagrams
    emit(JournalObserver(path), mirror="https://a.test", what="blob x", reason="line one\nline two")
    fields = parse_journal(receiver.recv(65536))
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "txregistry"
    assert fields["TXREGISTRY_NAMESPACE"] == "txregistry.test"
    assert fields["TXREGISTRY_MIRROR"] == "https://a.test"
    assert fields["TXREGISTRY_REASON"] == "line one\nline two"
    assert fields["MESSAGE"].startswith("Mirror request failed: https://a.test blob x: line one")


def test_journal_observer_falls_back_to_stderr_without_a_journal(tmp_path):
    fallback = io.StringIO()
    observer = JournalObserver(str(tmp_path / "no-journal"), fallback)
    Logger(observer=observer).emit(LogLevel.info, "hello {who}", who="world")
    assert fallback.getvalue() == "hello world\n"


def test_choosing_the_format():
    assert choose_observer("text") is None
    assert isinstance(choose_observer("json", stdout=io.StringIO()), JSONLinesObserver)
    assert isinstance(choose_observer("journal"), JournalObserver)
    assert choose_observer("auto", environ={}) is None
