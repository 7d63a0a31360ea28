"""
Telling systemd how txregistry is doing, for C{Type=notify} units.

C{READY=1} goes out once every listener is bound and the cache is open, so
that a daemon ordered after txregistry never starts before it can pull;
C{STOPPING=1} when a stop begins.  The protocol is one datagram to the Unix
socket named by C{$NOTIFY_SOCKET} (sd_notify(3)); without it, nothing is
sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send C{message} (such as C{"READY=1"}) to systemd; return whether it went."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as connection:
            connection.connect(address)
            connection.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True
