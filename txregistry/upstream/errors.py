"""
What an upstream request can end in, short of an answer: what the client
is then told is decided in L{txregistry.upstream.mirrors.conclude}.
"""

from __future__ import annotations

from collections.abc import Sequence

from txregistry.oci.errors import RegistryError

REFUSED_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}


class UpstreamNotFound(Exception):
    """The upstream says it has no such repository, manifest or blob."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UpstreamRefused(Exception):
    """Every mirror refused with the same 401, 403 or 429; the client should see that."""

    def __init__(self, mirror: str, status: int, message: str, retry_after: str | None) -> None:
        super().__init__(f"{mirror} answered HTTP {status}: {message}")
        self.mirror = mirror
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def as_registry_error(self) -> RegistryError:
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        return RegistryError(
            self.status,
            REFUSED_CODES[self.status],
            f"upstream {self.mirror} refused the request: {self.message}",
            headers=headers,
            # containerd asks with HEAD first, whose answer has no body.
            in_status_line=True,
        )


class UpstreamUnavailable(Exception):
    """No mirror answered usably; C{failures} holds each mirror and its reason."""

    def __init__(self, registry: str, failures: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{m}: {r}" for m, r in failures))
        self.registry = registry
        self.failures = list(failures)

    def as_registry_error(self) -> RegistryError:
        return RegistryError.upstream_unavailable(self.registry, self.failures)


class UpstreamOffline(UpstreamUnavailable):
    """The registry is in offline mode: no upstream is asked."""

    def __init__(self, registry: str) -> None:
        super().__init__(registry, [])

    def as_registry_error(self, what: str = "the content asked for is not cached") -> RegistryError:
        return RegistryError(
            503,
            "UNAVAILABLE",
            f"registry {self.registry} is in offline mode, and {what}"
            f" (an admin can switch it back: POST /admin/registries/{self.registry}/online)",
        )


UPSTREAM_ERRORS = (UpstreamNotFound, UpstreamRefused, UpstreamUnavailable)
