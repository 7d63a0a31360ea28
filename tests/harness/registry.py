"""
The CNCF distribution registry (Debian's docker-registry) as a test upstream.

Each registry gets a temporary storage directory, listens on a loopback port
the kernel picks, and has its access log read, so that a test can count the
requests txregistry made: "the second pull downloaded no blob".
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness.processes import Process
from txregistry.config import MirrorConfig, RegistryConfig

_ACCESS_RE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def registry_binary() -> str:
    path = shutil.which("docker-registry") or shutil.which("registry")
    if path is None:
        raise RuntimeError(
            "the distribution registry is not installed: apt-get install docker-registry"
        )
    return path


def hub(url: str, **kwargs: Any) -> RegistryConfig:
    """A docker.io registry whose upstream is a test registry."""
    return RegistryConfig("docker.io", (MirrorConfig(url),), default=True, **kwargs)


@dataclass(frozen=True)
class Access:
    method: str
    path: str
    status: int


class DistributionRegistry:
    """
    One distribution registry process on loopback.

    @param auth: the C{auth:} section of its config, for token or htpasswd auth.
    @param tls: a certificate and key file, to serve HTTPS.
    @param proxy: the C{proxy:} section, to run it as a pull-through cache.
    """

    def __init__(
        self,
        directory: Path,
        auth: dict[str, Any] | None = None,
        tls: tuple[Path, Path] | None = None,
        proxy: dict[str, Any] | None = None,
        port: int = 0,
    ) -> None:
        self.directory = directory
        self.auth = auth
        self.tls = tls
        self.proxy = proxy
        self.port = port
        self.process: Process | None = None
        self.url = ""

    def start(self) -> DistributionRegistry:
        self.directory.mkdir(parents=True, exist_ok=True)
        http: dict[str, Any] = {"addr": f"127.0.0.1:{self.port}", "secret": "test-secret"}
        if self.tls:
            http["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.directory / "data")},
                "delete": {"enabled": True},
            },
            "http": http,
        }
        if self.auth:
            config["auth"] = self.auth
        if self.proxy:
            config["proxy"] = self.proxy
        # JSON is YAML, and needs no YAML library.
        config_path = self.directory / "config.yml"
        config_path.write_text(json.dumps(config, indent=2))
        self.process = Process(
            [registry_binary(), "serve", str(config_path)], log=self.directory / "registry.log"
        )
        match = self.process.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        self.port = int(match.group(1))
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def accesses(self, since: int = 0) -> list[Access]:
        """The requests in the access log, from line C{since} on."""
        assert self.process is not None
        found = []
        for line in self.process.lines[since:]:
            match = _ACCESS_RE.search(line)
            if match:
                found.append(Access(match[1], match[2], int(match[3])))
        return found

    def mark(self) -> int:
        """
        A point in the access log after every request made so far.

        A marker request is made and its log line awaited.  The registry
        writes a request's log line before it finishes the response, so
        every request that has been answered is logged before the marker.
        """
        assert self.process is not None
        marker = uuid.uuid4().hex
        start = len(self.process.lines)
        url = f"{self.url}/v2/?marker={marker}"
        try:
            urllib.request.urlopen(url, context=_unverified()).close()
        except urllib.error.HTTPError:
            pass  # 401 from an auth registry is logged all the same
        self.process.wait_for(marker, start)
        return len(self.process.lines)

    def upload_blob(self, repository: str, chunks: Callable[[], Iterator[bytes]]) -> str:
        """Push one blob straight to this registry; see L{upload_blob}."""
        return upload_blob(self.port, repository, chunks)

    def blob_gets(self, since: int, repository: str | None = None) -> list[str]:
        """The blobs downloaded (GET, 200) since C{since}."""
        gets = []
        for access in self.accesses(since):
            match = re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64})", access.path)
            if access.method == "GET" and access.status == 200 and match:
                if repository is None or match[1] == repository:
                    gets.append(match[2])
        return gets


def upload_blob(port: int, repository: str, chunks: Callable[[], Iterator[bytes]]) -> str:
    """
    Push one blob straight to a plain-HTTP registry on loopback (a
    monolithic upload), from C{chunks()}, which is called twice: once to
    hash, once to send.  Returns its digest.
    """
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks():
        digest.update(chunk)
        size += len(chunk)
    name = f"sha256:{digest.hexdigest()}"
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("POST", f"/v2/{repository}/blobs/uploads/")
    started = connection.getresponse()
    started.read()
    assert started.status == 202, started.status
    location = urlsplit(started.headers["Location"])
    separator = "&" if location.query else "?"
    path = f"{location.path}?{location.query}{separator}digest={name}"
    connection.request("PUT", path, body=chunks(), headers={"Content-Length": str(size)})
    done = connection.getresponse()
    done.read()
    assert done.status == 201, done.status
    connection.close()
    return name


def _unverified():
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
