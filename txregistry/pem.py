"""
PEM certificate files, as both sides of TLS read them: a listener's
certificate and chain, and a registry's private CA (C{ca_file}).
"""

from __future__ import annotations

import re

_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def certificate_blocks(text: str) -> list[str]:
    """Each certificate in PEM text, in order; other blocks (keys) are skipped."""
    return _CERTIFICATE.findall(text)
