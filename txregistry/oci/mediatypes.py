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


def upstream_accept(*also: str) -> bytes:
    """
    The C{Accept} header to send upstream: every manifest and index type
    txregistry passes through, then C{also} (types a client named that are
    not among them).

    Accepting all four makes the upstream answer with what a tag names,
    unconverted, so that one answer serves every client.  Leaving one out
    changes the answer: distribution answers 404 "OCI manifest found, but
    accept header does not support OCI manifests" for an OCI type it is not
    told is accepted, and rewrites a Docker manifest list or manifest into
    another manifest for a client that does not accept it
    (registry/handlers/manifests.go, GetManifest).
    """
    types = list(MANIFEST_TYPES)
    for media_type in also:
        base = base_type(media_type)
        if base and base not in types:
            types.append(base)
    return ", ".join(types).encode("latin-1")


def base_type(media_type: str) -> str:
    """A media type without its parameters, in lower case."""
    return media_type.split(";")[0].strip().lower()


class Accepted:
    """
    What a request's C{Accept} header accepts, after RFC 9110 section
    12.5.1: C{*/*} and C{application/*} accept every manifest type, and a
    missing or empty header accepts everything (the spec only says a
    client SHOULD send one).  C{q=0} refuses a type, and the most specific
    entry decides: C{*/*, application/vnd.oci.image.index.v1+json;q=0}
    accepts everything but the OCI index.
    """

    def __init__(self, header: bytes) -> None:
        self.header = header.decode("latin-1").strip()
        # Exact types, type/* ranges (by their type) and */* (as "*"),
        # each with whether it is accepted (q > 0); the first entry wins.
        self._types: dict[str, bool] = {}
        self._ranges: dict[str, bool] = {}
        for element in self.header.split(","):
            media_range, *parameters = element.split(";")
            media_range = media_range.strip().lower()
            if not media_range:
                continue
            acceptable = _quality(parameters) > 0
            if media_range in ("*", "*/*"):
                self._ranges.setdefault("*", acceptable)
            elif media_range.endswith("/*"):
                self._ranges.setdefault(media_range[:-2], acceptable)
            else:
                self._types.setdefault(media_range, acceptable)
        if not self._types and not self._ranges:
            self._ranges["*"] = True

    def accepts(self, media_type: str) -> bool:
        """Whether a response of C{media_type} is acceptable to the client."""
        base = base_type(media_type)
        if base in self._types:
            return self._types[base]
        major = base.split("/")[0]
        if major in self._ranges:
            return self._ranges[major]
        return self._ranges.get("*", False)

    @property
    def named_types(self) -> tuple[str, ...]:
        """The exact types the client accepts, in the order it named them."""
        return tuple(t for t, acceptable in self._types.items() if acceptable)

    def key(self) -> str:
        """The header, normalized: the same for the same question asked in another order."""
        entries = [t if ok else f"{t};q=0" for t, ok in self._types.items()]
        entries += [
            ("*/*" if r == "*" else f"{r}/*") + ("" if ok else ";q=0")
            for r, ok in self._ranges.items()
        ]
        return ",".join(sorted(entries))

    def describe(self) -> str:
        """The header as the client sent it, for messages."""
        return repr(self.header[:500]) if self.header else "none"


def _quality(parameters: list[str]) -> float:
    """The q-value of one C{Accept} element; an unreadable one counts as 1."""
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 1.0
    return 1.0
