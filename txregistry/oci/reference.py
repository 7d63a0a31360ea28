"""
Names, tags and digests as the OCI distribution spec defines them.

Everything a client sends is checked here before it is used as a cache key,
an upstream URL or a log field, so nothing later has to worry about ``..``,
percent-encoding or over-long input.  See the spec's "Pulling" section:
https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from txregistry.oci.errors import RegistryError

# One path component of a repository name, and the whole name (spec, "name").
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([A-Za-z0-9=_-]+)")

# distribution rejects names longer than this (reference.NameTotalLengthMax).
MAX_NAME_LENGTH = 255

# The algorithms we can verify, with the length of their hex encoding.
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True)
class Digest:
    """A content digest such as ``sha256:<64 hex digits>``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """
        Parse and validate a digest, refusing algorithms we cannot verify:
        serving content we could not check would defeat the cache's promise.
        """
        match = _DIGEST_RE.fullmatch(text)
        if match is None:
            raise RegistryError.digest_invalid(f"invalid digest {text[:200]!r}")
        algorithm, encoded = match.groups()
        length = _HEX_LENGTHS.get(algorithm)
        if length is None:
            raise RegistryError.digest_invalid(
                f"unsupported digest algorithm {algorithm[:40]!r}"
                f" (supported: {', '.join(sorted(_HEX_LENGTHS))})"
            )
        if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
            raise RegistryError.digest_invalid(
                f"invalid {algorithm} digest: expected {length} lowercase hex digits"
            )
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of C{data}."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object for this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True)
class Tag:
    """A manifest tag such as ``3.20`` or ``latest``."""

    name: str

    @classmethod
    def parse(cls, text: str) -> Tag:
        if _TAG_RE.fullmatch(text) is None:
            raise RegistryError.tag_invalid(f"invalid tag {text[:200]!r}")
        return cls(text)

    def __str__(self) -> str:
        return self.name


Reference = Tag | Digest


def parse_reference(text: str, repository: str) -> Reference:
    """
    Parse the <reference> of a manifest URL in C{repository}: a digest if it
    contains a colon, which a tag never does, otherwise a tag.

    @raise RegistryError: 400 C{DIGEST_INVALID} for a bad digest; 404
        C{MANIFEST_UNKNOWN} for anything else that is not a tag.  Such a
        reference names no manifest any registry can hold, and the spec
        says a manifest that is not found MUST get 404 ("Pulling
        manifests"); C{TAG_INVALID} is for a pushed manifest whose tag does
        not match its URL.
    """
    if ":" in text:
        return Digest.parse(text)
    if _TAG_RE.fullmatch(text) is None:
        raise RegistryError.manifest_unknown(
            f"manifest {text[:200]!r} is unknown in {repository}: it is neither a tag nor a"
            " digest, so no registry can hold it; a tag is 1 to 128 letters, digits, '_',"
            " '.' and '-', not starting with '.' or '-'"
        )
    return Tag(text)


def validate_name(name: str) -> str:
    """Check a repository name against the spec's grammar and length limit."""
    if len(name) > MAX_NAME_LENGTH:
        raise RegistryError.name_invalid(
            f"repository name is longer than {MAX_NAME_LENGTH} characters"
        )
    if _NAME_RE.fullmatch(name) is None:
        raise RegistryError.name_invalid(f"invalid repository name {name[:200]!r}")
    return name


_DOMAIN_COMPONENT = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_OPTIONAL_PORT = r"(?::\d{1,5})?"
# A registry host name with an optional port (distribution's reference.domainAndPort,
# without its IPv6 literals, which cannot name a registry in a path or the config).
HOST_RE = re.compile(_DOMAIN_NAME + _OPTIONAL_PORT)
# The same with distribution's bracketed IPv6 literals: what a Host header may be.
HOST_OR_IPV6_RE = re.compile(rf"(?:{_DOMAIN_NAME}|\[[0-9A-Fa-f:]+\]){_OPTIONAL_PORT}")


def looks_like_registry_host(component: str) -> bool:
    """
    Whether the first component of an image name is a registry host rather
    than a namespace: the rule Docker uses to read ``ghcr.io/org/img`` and
    ``localhost:5000/img`` (distribution ``reference.splitDockerDomain``),
    for components that are host names at all (``..`` is not).
    """
    is_host = HOST_RE.fullmatch(component) is not None
    return is_host and ("." in component or ":" in component or component == "localhost")
