"""
The OCI error responses txregistry sends.

Every failure a client can see is a L{RegistryError}, rendered as the spec's
error JSON (``{"errors": [{"code", "message", "detail"}]}``), so that docker,
containerd, podman and skopeo print a useful message instead of a traceback.
See the spec's "Error Codes" section.
"""

from __future__ import annotations

import json
from typing import Any

# A reason phrase is a diagnostic on one line, not a document: cut it here.
MAX_REASON_PHRASE = 500


# The distribution spec's error codes ("Error Codes"): the ones a client knows.
SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)


def reason_phrase(text: str) -> bytes:
    """
    C{text} made fit for an HTTP/1.1 status line's reason phrase (RFC 9112
    section 4: spaces and visible ASCII): control characters become
    spaces, other characters are escaped, and it is cut to
    L{MAX_REASON_PHRASE} bytes.
    """
    printable = "".join(c if " " <= c <= "~" else " " if c.isspace() else c for c in text)
    phrase = " ".join(printable.split()).encode("ascii", "backslashreplace")
    phrase = bytes(b if 0x20 <= b <= 0x7E else 0x3F for b in phrase)
    if len(phrase) > MAX_REASON_PHRASE:
        phrase = phrase[: MAX_REASON_PHRASE - 3] + b"..."
    return phrase


def error_code_and_message(body: bytes) -> tuple[str | None, str]:
    """
    The code and message of the first error in an OCI error body, or no
    code and the body's start when it is not one (a proxy's HTML page).
    """
    try:
        document: Any = json.loads(body)
        error = document["errors"][0]
        return str(error.get("code")), str(error.get("message", ""))[:500]
    except Exception:
        return None, body[:200].decode("utf-8", "replace").strip()


class RegistryError(Exception):
    """
    A failure to report to the client with an HTTP status and an OCI code.

    @ivar headers: extra response headers, such as C{Retry-After}.
    @ivar in_status_line: whether the message is also sent as the status
        line's reason phrase.  By default it is for every 5xx: the Go
        clients (containers/image in skopeo and podman, Docker's
        distribution client, containerd) parse the error body of a 4xx
        only, and print the status line, reason phrase included, for
        anything else; a HEAD answer has no body at all.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        in_status_line: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})
        self.in_status_line = status >= 500 if in_status_line is None else in_status_line

    def reason_phrase(self) -> bytes | None:
        """The status line's reason phrase, or L{None} for the standard one."""
        return reason_phrase(self.message) if self.in_status_line else None

    def body(self) -> bytes:
        """The OCI error JSON for this error."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode("utf-8")

    def __repr__(self) -> str:
        return f"RegistryError({self.status}, {self.code!r}, {self.message!r})"

    # The constructors below name the cases of the spec's error table.

    @classmethod
    def name_invalid(cls, message: str) -> RegistryError:
        return cls(400, "NAME_INVALID", message)

    @classmethod
    def tag_invalid(cls, message: str) -> RegistryError:
        return cls(400, "TAG_INVALID", message)

    @classmethod
    def digest_invalid(cls, message: str) -> RegistryError:
        return cls(400, "DIGEST_INVALID", message)

    @classmethod
    def name_unknown(cls, message: str) -> RegistryError:
        return cls(404, "NAME_UNKNOWN", message)

    @classmethod
    def manifest_unknown(cls, message: str) -> RegistryError:
        return cls(404, "MANIFEST_UNKNOWN", message)

    @classmethod
    def unsupported(cls, message: str, status: int = 405) -> RegistryError:
        # A 405 must say which methods are allowed (RFC 9110 section 15.5.6).
        headers = {"Allow": "GET, HEAD"} if status == 405 else None
        return cls(status, "UNSUPPORTED", message, headers=headers)

    @classmethod
    def not_found(cls, message: str) -> RegistryError:
        # Not an OCI code: used for paths outside the /v2/ API.
        return cls(404, "NOT_FOUND", message)

    @classmethod
    def range_not_satisfiable(cls, size: int) -> RegistryError:
        return cls(
            416,
            "RANGE_INVALID",
            "requested range not satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )

    @classmethod
    def upstream_unavailable(cls, registry: str, failures: list[tuple[str, str]]) -> RegistryError:
        """
        A 502 that says which upstream failed and why, so that the person
        at the client can tell a DNS problem from a refused connection,
        and where to look next.  The status stays 502 so that clients
        with mirrors of their own fall back to the next one.
        """
        reasons = "; ".join(f"{mirror}: {reason}" for mirror, reason in failures)
        return cls(
            502,
            "UNAVAILABLE",
            f"upstream registry {registry} is unavailable: {reasons}"
            " (only cached content is served until a mirror answers;"
            " see the cache's /health or run 'txregistry doctor' on its host)",
            detail={
                "registry": registry,
                "mirrors": [{"mirror": mirror, "error": reason} for mirror, reason in failures],
            },
        )
