"""
What the benchmarks pull: random blobs and whole images, pushed to the upstream.

Random bytes, so that nothing on the way can compress them.  Each cold
measurement gets content of its own, so that it is cold for every server
measured, without restarting any of them.
"""

from __future__ import annotations

import http.client
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from harness.images import OCI_MANIFEST, Image, Layer, layer_tar
from harness.registry import upload_blob

REPOSITORY = "library/bench"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int

    def path(self, repository: str = REPOSITORY) -> str:
        return f"/v2/{repository}/blobs/{self.digest}"


def random_chunks(seed: int, size: int) -> Iterator[bytes]:
    """C{size} random bytes, the same for the same seed."""
    rng = random.Random(seed)
    for start in range(0, size, _CHUNK):
        yield rng.randbytes(min(_CHUNK, size - start))


def push_blob(port: int, seed: int, size: int) -> Blob:
    return Blob(upload_blob(port, REPOSITORY, lambda: random_chunks(seed, size)), size)


def _once(blob: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter([blob])


@dataclass(frozen=True)
class PushedImage:
    repository: str
    tag: str
    size: int

    def reference(self, host: str) -> str:
        return f"{host}/{self.repository}:{self.tag}"


def push_image(port: int, seed: int, layers: int, layer_size: int) -> PushedImage:
    """An image of C{layers} uncompressed layers of random bytes, under a repository of its own."""
    rng = random.Random(seed)
    image = Image(
        [
            Layer(layer_tar({f"layer{i}.bin": rng.randbytes(layer_size)}), compressed=False)
            for i in range(layers)
        ]
    )
    _, manifest = image.build()
    repository = f"library/image{seed}"
    for blob in image.blobs.values():
        if blob is not manifest:
            upload_blob(port, repository, _once(blob))
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request(
        "PUT",
        f"/v2/{repository}/manifests/latest",
        body=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    if response.status != 201:
        raise RuntimeError(f"pushing the manifest of {repository}: HTTP {response.status}")
    size = sum(len(blob) for blob in image.blobs.values())
    return PushedImage(repository, "latest", size)
