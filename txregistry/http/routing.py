"""
Which registry, repository and object a client's request is for.

txregistry is not an open proxy: a request can only select a registry that
is configured, so it never causes a connection to an address a client chose.
The registry comes from, in order:

 1. a first path component that names a configured registry
    (C{/v2/docker.io/library/alpine/...}, what podman sends for a mirror
    location with a path);
 2. the C{ns} query parameter containing C{containerd} appends to mirror
    requests (C{?ns=docker.io});
 3. otherwise the default registry.

A first component that looks like a registry host but is not configured is
refused, rather than being sent to the default registry as a namespace.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from txregistry.config import RegistryConfig, normalize_registry_name
from txregistry.oci.errors import RegistryError
from txregistry.oci.reference import (
    Digest,
    Reference,
    looks_like_registry_host,
    parse_reference,
    validate_name,
)
from txregistry.repository.interface import Kind, Route

# The name is greedy, so the last "/manifests/" in a path is the separator:
# "a/manifests/manifests/latest" is tag "latest" of repository "a/manifests".
_OBJECT_RE = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)")
_TAGS_RE = re.compile(r"(?P<name>.+)/tags/list")
_UPLOAD_RE = re.compile(r"(?P<name>.+)/blobs/uploads(?:/(?P<upload>[^/]*))?")
# An upload's id, as txregistry makes them (a UUID) or near enough to be
# looked up; anything else is no upload of ours.
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9_.=-]{1,100}")


class Router:
    """Maps request paths onto the configured registries."""

    def __init__(self, registries: Iterable[RegistryConfig]) -> None:
        self._by_name: dict[str, RegistryConfig] = {}
        self._default: RegistryConfig | None = None
        for registry in registries:
            for name in registry.names:
                self._by_name[name] = registry
            if registry.default:
                self._default = registry

    def registry_named(self, name: str) -> RegistryConfig | None:
        """The registry a name or alias selects, in any of its spellings."""
        try:
            return self._by_name.get(normalize_registry_name(name))
        except ValueError:
            return None

    def route(self, path: bytes, ns: bytes | None = None) -> Route:
        """
        Parse the path of a /v2/ request (raw, as it came on the wire).

        @raise RegistryError: for anything that is not a pull request for a
            configured registry.
        """
        try:
            text = path.decode("ascii")
        except UnicodeDecodeError:
            raise RegistryError.name_invalid("request path is not ASCII") from None
        if not text.startswith("/v2/"):
            raise RegistryError.not_found(f"no such path {text[:200]!r}")
        rest = text[len("/v2/") :]

        upload = ""
        match = _UPLOAD_RE.fullmatch(rest)
        if match is not None:
            kind, name, ref_text = Kind.UPLOADS, match["name"], None
            upload = match["upload"] or ""
            if upload and not _UPLOAD_ID_RE.fullmatch(upload):
                raise RegistryError(
                    404, "BLOB_UPLOAD_UNKNOWN", f"no upload {upload[:100]!r} in progress"
                )
        elif (match := _OBJECT_RE.fullmatch(rest)) is not None:
            kind = Kind(match["kind"])
            name = match["name"]
            ref_text = match["ref"]
        else:
            match = _TAGS_RE.fullmatch(rest)
            if match is None:
                # UNSUPPORTED: the spec's error codes are the only ones a 4xx
                # JSON body may carry, and none of them means "no such path".
                raise RegistryError.unsupported(
                    f"no such API path {text[:200]!r}: txregistry serves"
                    " manifests, blobs, tags/list and referrers",
                    status=404,
                )
            kind, name, ref_text = Kind.TAGS, match["name"], None

        registry, repository, prefix = self._select_registry(name, ns)
        validate_name(repository)
        if registry.is_docker_hub and "/" not in repository:
            repository = f"library/{repository}"

        reference: Reference | None = None
        if kind is Kind.MANIFEST:
            assert ref_text is not None
            reference = parse_reference(ref_text, repository)
        elif kind in (Kind.BLOB, Kind.REFERRERS):
            assert ref_text is not None
            reference = Digest.parse(ref_text)
        return Route(registry, repository, kind, reference, prefix, upload=upload)

    def _select_registry(self, name: str, ns: bytes | None) -> tuple[RegistryConfig, str, str]:
        first, _, remainder = name.partition("/")
        if remainder:
            registry = self.registry_named(first)
            if registry is not None:
                return registry, remainder, first
        if ns is not None:
            ns_text = ns.decode("ascii", "replace")
            registry = self.registry_named(ns_text)
            if registry is None:
                raise not_configured(ns_text)
            return registry, name, ""
        if remainder and looks_like_registry_host(first):
            raise not_configured(first)
        if self._default is None:
            raise RegistryError.name_unknown(
                "the request names no registry, and no registry is configured as the default"
            )
        return self._default, name, ""


def not_configured(registry: str) -> RegistryError:
    return RegistryError.name_unknown(
        f"registry {registry[:100]!r} is not configured in txregistry"
    )


def push_refused(registry: RegistryConfig) -> RegistryError:
    """
    A push to a registry that takes none: 403, which clients do not retry
    (Docker retries a 405), with what to configure instead.
    """
    return RegistryError(
        403,
        "DENIED",
        f"registry {registry.name} is a read-only pull-through cache in txregistry:"
        f" push to a hosted registry (a [[registry]] with hosted = true, pushed to as"
        f" localhost:5050/<name>/<image>), or set push = true on {registry.name} to push"
        " through to its origin",
    )
