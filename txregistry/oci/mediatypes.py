"""
The manifest media types txregistry passes through, and what a client's
C{Accept} header asks for.
"""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# Manifests that list other manifests, one per platform.
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
# Every manifest type txregistry passes through.
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)

# What to ask for when a client sends no Accept header: every manifest type
# we pass through.  Without it distribution would convert to schema 1.
DEFAULT_ACCEPT = ", ".join(MANIFEST_TYPES).encode("ascii")


def accept_key(accept: bytes) -> str:
    """
    The media types of an C{Accept} header, normalized, for use in a cache
    key: a tag can name a different manifest for a client that accepts
    indexes than for one that does not.
    """
    types = {
        part.split(";")[0].strip().lower()
        for part in accept.decode("latin-1").split(",")
        if part.strip()
    }
    return ",".join(sorted(types))
