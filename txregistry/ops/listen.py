"""
Listening endpoints: Twisted endpoint descriptions, with TLS done here.

A C{listen} entry is any Twisted server endpoint description.  Twisted's own
C{ssl:} parser cannot raise the minimum TLS version, nor reread a
certificate, so C{ssl:} entries are built here from the same syntax:

    ssl:5443:privateKey=/etc/txregistry/key.pem:certKey=/etc/txregistry/cert.pem:extraCertChain=/etc/txregistry/chain.pem

TLS 1.2 is the minimum, with Twisted's modern cipher list, and SIGHUP
rereads the PEM files: new connections get the new certificate, open ones
keep theirs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger

from txregistry.config import ConfigError

MINIMUM_TLS = TLSVersion.TLSv1_2
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_SSL_KEYS = {"privateKey", "certKey", "extraCertChain", "interface", "backlog"}


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description into its positional and keyword
    arguments, honouring Twisted's backslash escapes (C{interface=\\:\\:1}).
    """
    parts: list[str] = []
    current = ""
    escaped = False
    for character in description:
        if escaped:
            current += character
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == ":":
            parts.append(current)
            current = ""
        else:
            current += character
    parts.append(current)
    args = [p for p in parts if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts if "=" in p)
    return args, kwargs


class ReloadableTLS:
    """
    A listener's TLS settings, from PEM files that SIGHUP rereads.  Twisted
    asks for a context for each new connection, so a reload reaches new
    connections only, and the open ones are not dropped.
    """

    log = Logger()

    def __init__(self, certificate: Path, key: Path, chain: Path | None) -> None:
        self.certificate = certificate
        self.key = key
        self.chain = chain
        self._options = self._load()

    def _load(self) -> CertificateOptions:
        try:
            blocks = _PEM_CERTIFICATE.findall(self.certificate.read_text())
            if not blocks:
                raise ValueError(f"{self.certificate} holds no PEM certificate")
            if self.chain is not None:
                blocks += _PEM_CERTIFICATE.findall(self.chain.read_text())
            certificates = [x509.load_pem_x509_certificate(block.encode()) for block in blocks]
            key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
            # cryptography objects: pyOpenSSL deprecates its own X509 and
            # PKey, and accepts these; Twisted's type hints predate that.
            options = CertificateOptions(
                privateKey=cast(Any, key),
                certificate=cast(Any, certificates[0]),
                extraCertChain=cast(Any, certificates[1:]),
                raiseMinimumTo=MINIMUM_TLS,
            )
            # Builds the context now, so that a key that does not match its
            # certificate is caught here rather than at the first client.
            options.getContext()
        except Exception as e:
            raise ConfigError(f"TLS certificate {self.certificate}", _plain(e)) from None
        names = certificates[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.subject = str(names[0].value) if names else "?"
        self.expires = certificates[0].not_valid_after_utc.isoformat()
        return options

    def getContext(self) -> Any:
        return self._options.getContext()

    def reload(self) -> None:
        """Reread the PEM files; on a problem, keep the old certificate and say why."""
        try:
            self._options = self._load()
        except ConfigError as e:
            self.log.error(
                "TLS certificate not reloaded, keeping the old one: {error}", error=str(e)
            )
            return
        self.log.info(
            "reloaded TLS certificate {path}: {subject}, valid until {expires}",
            path=str(self.certificate),
            subject=self.subject,
            expires=self.expires,
        )


def _plain(error: Exception) -> str:
    if isinstance(error, OSError):
        return f"cannot read {error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


def server_endpoint(
    reactor: Any, description: str
) -> tuple[IStreamServerEndpoint, ReloadableTLS | None]:
    """
    The endpoint of a C{listen} entry, and its TLS settings if it is an
    C{ssl:} one.

    @raise ConfigError: for a description or certificate that cannot be used.
    """
    if not description.startswith("ssl:"):
        try:
            return serverFromString(reactor, description), None
        except Exception as e:
            raise ConfigError(
                "", f"{description!r} is not a valid endpoint description: {e}"
            ) from None
    args, kwargs = split_description(description)
    unknown = set(kwargs) - _SSL_KEYS
    if unknown:
        raise ConfigError("", f"{description!r}: unknown ssl: option {sorted(unknown)[0]!r}")
    if len(args) != 2 or not args[1].isdigit():
        raise ConfigError("", f"{description!r}: expected ssl:PORT:privateKey=...:certKey=...")
    if "privateKey" not in kwargs:
        raise ConfigError("", f"{description!r}: needs privateKey=FILE")
    chain = kwargs.get("extraCertChain")
    tls = ReloadableTLS(
        Path(kwargs.get("certKey", kwargs["privateKey"])),
        Path(kwargs["privateKey"]),
        Path(chain) if chain else None,
    )
    endpoint = SSL4ServerEndpoint(
        reactor,
        int(args[1]),
        tls,
        backlog=int(kwargs.get("backlog", 50)),
        interface=kwargs.get("interface", ""),
    )
    return endpoint, tls
