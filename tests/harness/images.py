"""
Test images, built from scratch as OCI image layouts that skopeo can push.

Every image is deterministic for a given seed, so its digests are known
before it is pushed and can be compared with what a pull returns.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tarball holding C{files}, reproducibly."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


@dataclass
class Layer:
    tar: bytes
    compressed: bool = True

    @property
    def blob(self) -> bytes:
        if not self.compressed:
            return self.tar
        return gzip.compress(self.tar, compresslevel=1, mtime=0)

    @property
    def media_type(self) -> str:
        return OCI_LAYER_GZIP if self.compressed else OCI_LAYER


@dataclass
class Image:
    """One single-platform image: its layers, config and manifest."""

    layers: list[Layer]
    architecture: str = "amd64"
    os: str = "linux"
    blobs: dict[str, bytes] = field(default_factory=dict)

    def build(self) -> tuple[str, bytes]:
        """Build the blobs; return the manifest's digest and bytes."""
        layer_descriptors = []
        diff_ids = []
        for layer in self.layers:
            blob = layer.blob
            self.blobs[sha256(blob)] = blob
            layer_descriptors.append(
                {"mediaType": layer.media_type, "digest": sha256(blob), "size": len(blob)}
            )
            diff_ids.append(sha256(layer.tar))
        config = json.dumps(
            {
                "architecture": self.architecture,
                "os": self.os,
                "config": {"Env": ["PATH=/usr/bin:/bin"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            },
            sort_keys=True,
        ).encode()
        self.blobs[sha256(config)] = config
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
                "layers": layer_descriptors,
            },
            indent=3,  # not compact: a re-serialising proxy would change the digest
        ).encode()
        self.blobs[sha256(manifest)] = manifest
        self.manifest = manifest
        return sha256(manifest), manifest


def small_image(seed: int, layers: int = 3) -> Image:
    """An image of several small layers, distinct for each seed."""
    rng = random.Random(seed)
    return Image(
        [
            Layer(
                layer_tar(
                    {f"layer{i}/file{j}": rng.randbytes(rng.randint(100, 20000)) for j in range(3)}
                )
            )
            for i in range(layers)
        ]
    )


def big_image(size: int, seed: int = 0) -> Image:
    """An image with one incompressible, uncompressed layer of C{size} bytes."""
    rng = random.Random(seed)
    return Image([Layer(layer_tar({"big.bin": rng.randbytes(size)}), compressed=False)])


def write_layout(directory: Path, tag: str, images: list[Image], index: bool = False) -> str:
    """
    Write an OCI image layout holding one image, or an index of several when
    C{index} is true.  Returns the digest of the top-level manifest.
    """
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    descriptors = []
    for image in images:
        digest, manifest = image.build()
        for blob_digest, blob in image.blobs.items():
            path = blobs_dir / blob_digest.split(":", 1)[1]
            if not path.exists():
                path.write_bytes(blob)
        descriptors.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(manifest),
                "platform": {"architecture": image.architecture, "os": image.os},
            }
        )
    if index:
        index_bytes = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}, indent=2
        ).encode()
        top_digest = sha256(index_bytes)
        (blobs_dir / top_digest.split(":", 1)[1]).write_bytes(index_bytes)
        top = {"mediaType": OCI_INDEX, "digest": top_digest, "size": len(index_bytes)}
    else:
        top = dict(descriptors[0])
        top.pop("platform")
        top_digest = top["digest"]
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return top_digest
