"""
C{txregistry prefetch}: warm a running txregistry's cache with images.

It pulls each image through txregistry as a client would (manifests, the
platform's manifest from an index, the config and every layer), checking
every blob against its digest and throwing the bytes away: what stays is
txregistry's cached copy.  It is for pre-warming common base images after
deployment.
"""

from __future__ import annotations

import json
import platform
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO, Any

from txregistry.config import DOCKER_HUB_NAMES, normalize_registry_name
from txregistry.oci.errors import RegistryError, error_code_and_message
from txregistry.oci.mediatypes import INDEX_TYPES, MANIFEST_TYPES
from txregistry.oci.reference import Digest, Tag, looks_like_registry_host, validate_name
from txregistry.ops.listen import split_description

ACCEPT = ", ".join(MANIFEST_TYPES)
_MACHINES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm/v7",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class PrefetchError(Exception):
    """A reference could not be prefetched; the message says why."""


@dataclass(frozen=True)
class ImageRef:
    """An image, as users write it: C{alpine:3.20}, C{ghcr.io/org/img@sha256:...}."""

    registry: str
    repository: str
    reference: str

    def __str__(self) -> str:
        separator = "@" if ":" in self.reference else ":"
        return f"{self.registry}/{self.repository}{separator}{self.reference}"

    def path(self, kind: str, reference: str) -> str:
        # txregistry selects the registry by the first path component.
        return f"/v2/{self.registry}/{self.repository}/{kind}/{reference}"


def parse_image_ref(text: str) -> ImageRef:
    """Read an image reference the way docker does; raise L{ValueError} if it is not one."""
    name, reference = text, "latest"
    if "@" in text:
        name, reference = text.split("@", 1)
    else:
        head, _, last = text.rpartition("/")
        if ":" in last:
            last, reference = last.rsplit(":", 1)
            name = f"{head}/{last}" if head else last
    first, _, rest = name.partition("/")
    if rest and looks_like_registry_host(first):
        registry, repository = normalize_registry_name(first), rest
    else:
        registry, repository = "docker.io", name
    if registry in DOCKER_HUB_NAMES and "/" not in repository:
        repository = f"library/{repository}"
    try:
        validate_name(repository)
        if ":" in reference:
            Digest.parse(reference)
        else:
            Tag.parse(reference)
    except RegistryError as e:
        raise ValueError(f"{text!r}: {e.message}") from None
    return ImageRef(registry, repository, reference)


def host_platform() -> str:
    """This machine's platform, as image indexes name them: C{linux/amd64}."""
    return "linux/" + _MACHINES.get(platform.machine().lower(), platform.machine().lower())


def server_from_listen(listen: tuple[str, ...]) -> str:
    """The URL of txregistry's first TCP or TLS listener."""
    for description in listen:
        args, kwargs = split_description(description)
        if args and args[0] in ("tcp", "tcp6", "ssl") and len(args) > 1:
            interface = kwargs.get("interface", "")
            host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(interface, interface)
            host = f"[{host}]" if ":" in host else host
            scheme = "https" if args[0] == "ssl" else "http"
            return f"{scheme}://{host}:{args[1]}"
    raise PrefetchError("no TCP listener in the config: give --server")


class _Client:
    """Talks to txregistry over HTTP, as a registry client."""

    def __init__(self, server: str) -> None:
        self._server = server.rstrip("/")
        self._context = ssl.create_default_context()

    def open(self, path: str, accept: str | None = None) -> Any:
        request = urllib.request.Request(self._server + path)
        if accept:
            request.add_header("Accept", accept)
        try:
            return urllib.request.urlopen(request, context=self._context, timeout=300)
        except urllib.error.HTTPError as e:
            raise PrefetchError(f"HTTP {e.code}: {_error_message(e.read())}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PrefetchError(f"cannot reach txregistry at {self._server}: {reason}") from None

    def manifest(self, image: ImageRef, reference: str) -> tuple[str, dict[str, Any]]:
        with self.open(image.path("manifests", reference), ACCEPT) as response:
            body = response.read()
            media_type = response.headers.get("Content-Type", "")
        try:
            return media_type, json.loads(body)
        except ValueError:
            raise PrefetchError(f"manifest {reference} is not JSON") from None


def _error_message(body: bytes) -> str:
    code, message = error_code_and_message(body)
    return f"{code}: {message}" if code else message


class Progress:
    """A progress bar on a terminal; a line per image elsewhere."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._tty = out.isatty()

    def update(self, label: str, done: int, total: int) -> None:
        if not self._tty or total == 0:
            return
        width = 30
        filled = width * done // total
        self._out.write(
            f"\r{label[:40]:40} [{'#' * filled}{' ' * (width - filled)}]"
            f" {100 * done // total:3d}% {_mib(done)}/{_mib(total)}"
        )
        self._out.flush()

    def finish(self, text: str) -> None:
        if self._tty:
            self._out.write("\r\x1b[K")
        self._out.write(text + "\n")
        self._out.flush()


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _platform_of(entry: dict[str, Any]) -> str:
    found = entry.get("platform") or {}
    name = f"{found.get('os', '?')}/{found.get('architecture', '?')}"
    return name + (f"/{found['variant']}" if found.get("variant") else "")


def _matches(entry: dict[str, Any], wanted: str) -> bool:
    have = _platform_of(entry)
    return have == wanted or (wanted.count("/") == 1 and have.startswith(wanted + "/"))


def prefetch(
    client: _Client,
    image: ImageRef,
    platforms: str | None,
    progress: Progress,
) -> None:
    """
    Pull one image through txregistry.  C{platforms} is one platform to
    pick from an index, or L{None} for all of them.
    """
    media_type, document = client.manifest(image, image.reference)
    if media_type in INDEX_TYPES or "manifests" in document:
        entries = [
            e for e in document.get("manifests", []) if platforms is None or _matches(e, platforms)
        ]
        if not entries:
            available = ", ".join(_platform_of(e) for e in document.get("manifests", []))
            raise PrefetchError(f"no {platforms} image in the index (it has {available})")
        images = [(e["digest"], _platform_of(e)) for e in entries]
    else:
        images = [(image.reference, "")]
    for reference, platform_name in images:
        if reference != image.reference:
            _, document = client.manifest(image, reference)
        blobs = [document["config"], *document.get("layers", [])]
        total = sum(int(b.get("size", 0)) for b in blobs)
        label = f"{image}" + (f" ({platform_name})" if platform_name else "")
        done = 0
        for blob in blobs:
            done = _fetch_blob(client, image, blob["digest"], label, done, total, progress)
        progress.finish(f"prefetched {label}: {len(blobs)} blobs, {_mib(done)}")


def _fetch_blob(
    client: _Client,
    image: ImageRef,
    digest_text: str,
    label: str,
    done: int,
    total: int,
    progress: Progress,
) -> int:
    digest = Digest.parse(digest_text)
    hasher = digest.hasher()
    with client.open(image.path("blobs", digest_text)) as response:
        while chunk := response.read(1 << 20):
            hasher.update(chunk)
            done += len(chunk)
            progress.update(label, done, total)
    if hasher.hexdigest() != digest.hex:
        raise PrefetchError(f"blob {digest} arrived with another digest")
    return done


def run(
    server: str, references: list[str], platforms: str | None, out: IO[str] = sys.stdout
) -> int:
    """Prefetch every reference; return the exit code."""
    client = _Client(server)
    progress = Progress(out)
    failed = 0
    for text in references:
        try:
            prefetch(client, parse_image_ref(text), platforms, progress)
        except (ValueError, PrefetchError) as e:
            progress.finish(f"txregistry prefetch: {text}: {e}")
            failed += 1
    return 1 if failed else 0
