"""Byte ranges of blob requests (RFC 9110 section 14)."""

from __future__ import annotations

import re

from txregistry.oci.errors import RegistryError

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """
    The byte range C{[start, end)} a single-range C{Range} header asks for,
    or L{None} to send the whole blob (no header, several ranges, or one we
    cannot parse, which RFC 9110 section 14.2 lets a server ignore).

    @raise RegistryError: 416, if the range starts past the end or ends
        before it starts.
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.decode("latin-1").strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            raise RegistryError.range_not_satisfiable(size)
        return max(0, size - suffix), size
    start = int(first)
    if start >= size or (last and int(last) < start):
        # A last byte before the first is an invalid range (RFC 9110 section
        # 14.1.1): 416, as distribution (Go's http.ServeContent) answers, and
        # the spec's conformance suite expects ("range 500-0").
        raise RegistryError.range_not_satisfiable(size)
    end = size if not last else min(int(last) + 1, size)
    return start, end
