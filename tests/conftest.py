"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import pytest
from twisted.logger import formatEvent, globalLogPublisher


class CapturedLogs(list):
    """Every log event emitted during a test, formatted as text; C{events} has them raw."""

    def __init__(self):
        super().__init__()
        self.events = []

    def text(self) -> str:
        return "\n".join(self)

    def matching(self, fragment: str) -> list[str]:
        return [line for line in self if fragment in line]


@pytest.fixture
def logs():
    captured = CapturedLogs()

    def observe(event):
        captured.events.append(event)
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        captured.append(text)

    globalLogPublisher.addObserver(observe)
    yield captured
    globalLogPublisher.removeObserver(observe)


@pytest.fixture(scope="session")
def swift(tmp_path_factory):
    """OpenStack Swift with s3api on loopback, holding the bucket L{BUCKET}."""
    from harness.swift import BUCKET, Swift, create_bucket

    server = Swift(tmp_path_factory.mktemp("swift")).start()
    try:
        create_bucket(server.endpoint, BUCKET)
        yield server
    finally:
        server.stop()
