"""
Where log events go: twistd's text, JSON lines, or systemd's journal.

The format is the config's C{[log] format}.  The JSON and journal observers
keep an event's fields (C{mirror}, C{digest}, ...) as fields, so that a log
shipper or C{journalctl -u txregistry TXREGISTRY_MIRROR=...} can select on
them.  No field ever holds a secret: passwords and tokens are never put in
a log event to begin with.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITIES = {
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}


def _message(event: LogEvent) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


def _fields(event: LogEvent) -> dict[str, Any]:
    """An event's own fields: simple values, without Twisted's bookkeeping."""
    return {
        key: value
        for key, value in event.items()
        if not key.startswith("log_")
        and key not in ("message", "format", "isError", "time", "system")
        and isinstance(value, (str, int, float, bool))
    }


@implementer(ILogObserver)
class JSONLinesObserver:
    """One JSON object per line: time, level, namespace, message and fields."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level", LogLevel.info)
        record = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
            "level": level.name,
            "namespace": event.get("log_namespace", ""),
            "message": _message(event),
            **_fields(event),
        }
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()


def _journal_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" not in data:
        return key + b"=" + data + b"\n"
    # The journal's binary form, for values with line breaks.
    return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


@implementer(ILogObserver)
class JournalObserver:
    """
    Writes events to systemd's journal with its native protocol, fields
    included: C{MESSAGE}, C{PRIORITY}, C{SYSLOG_IDENTIFIER=txregistry},
    C{TXREGISTRY_NAMESPACE}, and C{TXREGISTRY_<FIELD>} for each of the
    event's own fields.
    """

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: IO[str] = sys.stderr) -> None:
        self._path = path
        self._fallback = fallback
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __call__(self, event: LogEvent) -> None:
        message = _message(event)
        entry = [
            _journal_field("MESSAGE", message),
            _journal_field("PRIORITY", str(_PRIORITIES.get(event.get("log_level"), 6))),
            _journal_field("SYSLOG_IDENTIFIER", "txregistry"),
            _journal_field("TXREGISTRY_NAMESPACE", str(event.get("log_namespace", ""))),
        ]
        for key, value in _fields(event).items():
            name = "TXREGISTRY_" + "".join(c if c.isalnum() else "_" for c in key.upper())
            entry.append(_journal_field(name, str(value)))
        try:
            self._socket.sendto(b"".join(entry), self._path)
        except OSError:
            self._fallback.write(message + "\n")
            self._fallback.flush()


def choose_observer(
    format: str, environ: Mapping[str, str] = os.environ, stdout: IO[str] = sys.stdout
) -> ILogObserver | None:
    """
    The observer for C{[log] format}, or L{None} for twistd's own text.
    C{auto} means the journal when systemd connected our output to it
    (C{$JOURNAL_STREAM}) and its socket is there.
    """
    if format == "auto":
        journal = environ.get("JOURNAL_STREAM") and os.path.exists(JOURNAL_SOCKET)
        format = "journal" if journal else "text"
    if format == "json":
        return JSONLinesObserver(stdout)
    if format == "journal":
        return JournalObserver()
    return None
