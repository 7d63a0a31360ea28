"""
What a failed push to an origin becomes: an error that names the step, the
origin's answer, and the likely cause, for the client and for the log.

The causes are the field's (issue 12): a registry behind a CDN answered
C{unknown blob} to every push, while logins and pulls worked.

 - A request body over a proxy's or CDN's limit: 100 MB on Cloudflare's
   Free and Pro plans (distribution #2042).  It shows as a 413, or as a
   connection cut once about a round number of bytes has gone through.
 - A C{Location} that turns https into http, from a registry behind a TLS
   terminator that does not pass C{X-Forwarded-Proto} (distribution #996,
   #2225).
 - C{BLOB_UNKNOWN} on a manifest whose blobs were all pushed: replicas
   without shared storage, or a store that is not yet consistent
   (distribution #3901).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from txregistry.oci.errors import SPEC_CODES, RegistryError

_MB, _MiB = 1000 * 1000, 1 << 20
# Body limits as proxies and CDNs set them: 1, 2, 5, 10, 20, 25, 50, 100,
# 200, 250, 500 ... of MB or MiB (nginx's default is 1m, Cloudflare's 100 MB).
_ROUND_SIZES = sorted(
    m * unit
    for unit in (_MB, _MiB)
    for m in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 4000, 5000)
)
# How far below a limit a cut counts as "near" it: the bytes in flight in
# the proxy's own buffers when it gives up.
_NEAR = 256 << 10


def near_round_size(received: int) -> int | None:
    """The round size that C{received} bytes stop just short of, if any."""
    for size in _ROUND_SIZES:
        if size - _NEAR <= received <= size + _NEAR // 4:
            return size
    return None


def body_limit_cause(chunk_size: int) -> str:
    return (
        "a proxy or CDN in front of the registry limits request bodies (Cloudflare's Free and"
        f" Pro plans allow 100 MB): lower push_chunk_size (now {format_size(chunk_size)})"
        " for this registry"
    )


SCHEME_CAUSE = (
    "the registry is behind a TLS-terminating proxy that does not tell it the scheme:"
    " make the proxy send X-Forwarded-Proto: https (and the registry trust it), or set"
    " the registry's own base URL to https"
)

STORAGE_CAUSE = (
    "every blob was pushed and accepted, yet the registry does not find one: its storage is"
    " not shared between its replicas, or not yet consistent; make every replica use the"
    " same storage (and sticky sessions or a consistent store)"
)


# The spec's codes an origin's 400 or 404 may pass on to the client; the
# access and rate codes come with their own statuses, decided below.
PASSED_ON_CODES = SPEC_CODES - {"UNAUTHORIZED", "DENIED", "TOOMANYREQUESTS"}


def format_size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


@dataclass(frozen=True)
class OriginAnswer:
    """What the origin said to a failed step, as far as it said anything."""

    status: int | None = None
    code: str | None = None
    message: str = ""

    def describe(self) -> str:
        if self.status is None:
            return self.message or "no answer"
        text = f"HTTP {self.status}"
        if self.code:
            text += f" {self.code}"
        if self.message:
            text += f": {self.message}"
        return text


class PushFailed(RegistryError):
    """
    A push to the origin failed.  It is the client's error as it stands: the
    message names the origin, the step, the origin's answer and the likely
    cause, and the detail holds them one by one.

    Its status decides what the client does, and what it shows: Docker
    and containers/image print the error body of a 4xx, but of a 5xx only
    the status line, and retry a 5xx.  So:

     - C{403 DENIED} when the origin refused txregistry's credentials (a
       C{401} would make the client offer its own, which the origin never
       sees), and C{429} when it asks to slow down;
     - C{502 UNAVAILABLE} when the origin gave no answer or a 5xx and there
       is no diagnosis: it may well work the next time;
     - a 4xx otherwise, with the origin's code if it is one of the spec's:
       a body limit, a Location turned to http, lost blobs, which no retry
       gets past, and whose message the client must show.
    """

    def __init__(
        self,
        origin: str,
        step: str,
        answer: OriginAnswer,
        cause: str | None = None,
        what: str = "",
    ) -> None:
        manifest_step = "manifest" in step
        if answer.status in (401, 403):
            status, code = 403, "DENIED"
        elif answer.status == 429:
            status, code = 429, "TOOMANYREQUESTS"
        elif cause is None and (answer.status is None or answer.status >= 500):
            status, code = 502, "UNAVAILABLE"
        else:
            status = answer.status if answer.status in (400, 404) else 400
            code = answer.code if answer.code in PASSED_ON_CODES else ""
            if manifest_step and code == "BLOB_UNKNOWN":
                code = "MANIFEST_BLOB_UNKNOWN"
            if not code:
                code = "MANIFEST_INVALID" if manifest_step else "BLOB_UPLOAD_INVALID"
        text = f"push{' of ' + what if what else ''} to {origin} failed at {step}: "
        text += answer.describe()
        if cause:
            text += f"; likely cause: {cause}"
        detail: dict[str, Any] = {"origin": origin, "step": step, "status": answer.status}
        if answer.code:
            detail["code"] = answer.code
        if answer.message:
            detail["message"] = answer.message
        if cause:
            detail["cause"] = cause
        super().__init__(status, code, text, detail=detail)
        self.origin = origin
        self.step = step
        self.answer = answer
        self.cause = cause
