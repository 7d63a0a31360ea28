"""Checking what arrived against the digest and size it was asked for."""

from __future__ import annotations

from txregistry.oci.reference import Digest


class BlobCheckFailed(Exception):
    """What the upstream sent is not the blob that was asked for."""


def check_blob(digest: Digest, expected_size: int | None, received: int, actual_hex: str) -> None:
    if expected_size is not None and received != expected_size:
        raise BlobCheckFailed(
            f"upstream sent {received} bytes of {digest}, but announced {expected_size}"
        )
    if actual_hex != digest.hex:
        raise BlobCheckFailed(
            f"upstream sent content with digest {digest.algorithm}:{actual_hex} for {digest}"
        )
