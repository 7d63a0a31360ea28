"""
What the push scenario sends: one layer, from a file, as containerd,
BuildKit and Docker 29 send it (C{POST}, then one C{PUT ?digest=} with the
whole body), timed from the C{POST} to the C{201}.

Each push gets content of its own (a number written into the file's first
bytes), so that no registry has the blob already and skips it.
"""

from __future__ import annotations

import hashlib
import http.client
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.content import random_chunks

# http.client sends a file in pieces of this size.
_BLOCK = 1 << 20


class LayerFile:
    """A file of random bytes, made distinct before each push."""

    def __init__(self, path: Path, size: int, seed: int) -> None:
        self.path = path
        self.size = size
        with open(path, "wb") as f:
            for chunk in random_chunks(seed, size):
                f.write(chunk)
        self._pushes = 0

    def next_digest(self) -> str:
        """Make the file's content new; return its digest."""
        self._pushes += 1
        with open(self.path, "r+b") as f:
            f.write(self._pushes.to_bytes(8, "big"))
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(_BLOCK):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"


def push_layer(host: str, repository: str, layer: LayerFile, digest: str) -> float:
    """POST, then PUT the whole layer; the seconds from the POST to the 201."""
    hostname, _, port = host.partition(":")
    connection = http.client.HTTPConnection(hostname, int(port), blocksize=_BLOCK, timeout=600)
    started = time.perf_counter()
    connection.request("POST", f"/v2/{repository}/blobs/uploads/", headers={"Content-Length": "0"})
    opened = connection.getresponse()
    opened.read()
    if opened.status != 202:
        raise RuntimeError(f"POST to {host}/{repository}: HTTP {opened.status}")
    location = urlsplit(opened.headers["Location"])
    query = f"{location.query}&digest={digest}" if location.query else f"digest={digest}"
    path = f"{location.path}?{query}"
    with open(layer.path, "rb") as body:
        connection.request(
            "PUT",
            path,
            body=body,
            headers={"Content-Length": str(layer.size), "Content-Type": "application/octet-stream"},
        )
        done = connection.getresponse()
        text = done.read()
    elapsed = time.perf_counter() - started
    connection.close()
    if done.status != 201:
        raise RuntimeError(f"PUT to {host}/{repository}: HTTP {done.status}: {text[:500]!r}")
    return elapsed
