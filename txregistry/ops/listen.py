"""
Listening endpoints: Twisted endpoint descriptions, with TLS done here.

A C{listen} entry is any Twisted server endpoint description.  Twisted's own
C{ssl:} parser cannot raise the minimum TLS version, nor reread a
certificate, so C{ssl:} entries are built here from the same syntax:

    ssl:5443:privateKey=/etc/txregistry/key.pem:certKey=/etc/txregistry/cert.pem:extraCertChain=/etc/txregistry/chain.pem

TLS 1.2 is the minimum, with Twisted's modern cipher list, and SIGHUP
rereads the PEM files: new connections get the new certificate, open ones
keep theirs.

The common types (C{tcp:}, C{tcp6:}, C{unix:}, C{systemd:}) are checked
here before Twisted parses them, because Twisted's parsers say what is
wrong as a Python error (C{invalid literal for int() with base 10}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.plugin import getPlugins

from txregistry.config import ConfigError
from txregistry.pem import certificate_blocks

MINIMUM_TLS = TLSVersion.TLSv1_2
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
            blocks = certificate_blocks(self.certificate.read_text())
            if not blocks:
                raise ValueError(f"{self.certificate} holds no PEM certificate")
            if self.chain is not None:
                blocks += certificate_blocks(self.chain.read_text())
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


# The endpoint types checked here before Twisted sees them, so that a
# mistake is named in words rather than as the Python error Twisted's
# parsers raise (C{invalid literal for int()}): each type's positional
# parameters, in order, and its optional ones.
_PLAIN_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tcp": (("port",), ("interface", "backlog")),
    "tcp6": (("port",), ("backlog", "interface")),
    "unix": (("address",), ("mode", "backlog", "lockfile")),
    "systemd": (("domain",), ("index", "name")),
}
_SYNTAX = {
    "tcp": "tcp:PORT:interface=ADDRESS",
    "tcp6": "tcp6:PORT:interface=ADDRESS",
    "unix": "unix:PATH:mode=666",
    "systemd": "systemd:domain=INET:index=0 (or name=NAME)",
    "ssl": "ssl:PORT:privateKey=FILE:certKey=FILE",
}
_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


def _port(description: str, value: str, syntax: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise ConfigError(
            "", f"{description!r}: port {value!r} is not a port number (0 to 65535): use {syntax}"
        )
    return int(value)


def _check_integer(description: str, name: str, value: str, base: int = 10) -> None:
    digits = "01234567" if base == 8 else "0123456789"
    if not value or any(c not in digits for c in value):
        kind = "an octal number, as in 660" if base == 8 else "a whole number"
        raise ConfigError("", f"{description!r}: {name}={value!r} is not {kind}")


def _check_plain(description: str, inner: str | None = None) -> None:
    """
    Check a C{tcp:}, C{tcp6:}, C{unix:} or C{systemd:} description (or the
    one C{inner}, within C{haproxy:}) against the parameters its Twisted
    parser takes.

    @raise ConfigError: naming what is wrong, and the syntax to use.
    """
    args, kwargs = split_description(description if inner is None else inner)
    kind = _type_of(args[0])
    if kind == "haproxy" and inner is None and len(args) > 1:
        # haproxy:tcp:5050 wraps another description.
        _check_plain(description, description.split(":", 1)[1])
        return
    if kind not in _PLAIN_TYPES:
        return
    positional, optional = _PLAIN_TYPES[kind]
    syntax = _SYNTAX[kind]
    names = positional + optional
    if len(args) - 1 > len(names):
        extra = args[1 + len(names)]
        raise ConfigError("", f"{description!r}: unexpected {extra!r}: use {syntax}")
    values = dict(zip(names, args[1:], strict=False))
    for name, value in kwargs.items():
        if name not in names:
            known = ", ".join(names)
            raise ConfigError(
                "",
                f"{description!r}: unknown {kind}: option {name!r} (known: {known}): use {syntax}",
            )
        if name in values:
            raise ConfigError("", f"{description!r}: {name} is given twice: use {syntax}")
        values[name] = value
    missing = [name for name in positional if name not in values]
    if missing:
        raise ConfigError("", f"{description!r}: no {missing[0]}: use {syntax}")
    if "port" in values:
        _port(description, values["port"], syntax)
    if "backlog" in values:
        _check_integer(description, "backlog", values["backlog"])
    if "mode" in values:
        _check_integer(description, "mode", values["mode"], base=8)
    if "lockfile" in values and values["lockfile"] not in ("0", "1"):
        raise ConfigError("", f"{description!r}: lockfile={values['lockfile']!r} is not 0 or 1")
    if kind == "systemd":
        if values["domain"] not in _SYSTEMD_DOMAINS:
            raise ConfigError(
                "",
                f"{description!r}: domain={values['domain']!r} is not one of "
                f"{', '.join(_SYSTEMD_DOMAINS)}: use {syntax}",
            )
        if ("index" in values) == ("name" in values):
            raise ConfigError(
                "", f"{description!r}: give exactly one of index= and name=: use {syntax}"
            )
        if "index" in values:
            _check_integer(description, "index", values["index"])


_BUILT_IN_TYPES = ("tcp", "unix", "ssl")


def _type_of(kind: str) -> str:
    """
    An endpoint type as Twisted matches it: its built-in types exactly
    (C{TCP} is none of them), its plugins' without regard to case.
    """
    return kind if kind in _BUILT_IN_TYPES or kind.lower() in _BUILT_IN_TYPES else kind.lower()


def _endpoint_types() -> set[str]:
    """Every endpoint type Twisted can parse here, plugins included."""
    plugins = getPlugins(IStreamServerEndpointStringParser)
    return set(_BUILT_IN_TYPES) | {plugin.prefix.lower() for plugin in plugins}


def _plain_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    A description other than C{ssl:}, checked here where txregistry knows
    its type, then built by Twisted.
    """
    _check_plain(description)
    kind = _type_of(split_description(description)[0][0])
    if kind not in _endpoint_types():
        raise ConfigError(
            "",
            f"{description!r}: unknown endpoint type {kind!r}: "
            f"use one of {', '.join(_SYNTAX.values())}",
        )
    try:
        return cast(IStreamServerEndpoint, serverFromString(reactor, description))
    except Exception as e:
        if kind == "systemd":
            # Twisted looks the socket up while parsing.
            problem = (
                "systemd passed no such socket: run txregistry from a .socket unit "
                "that provides it, or listen on tcp:PORT"
            )
        else:
            # A type txregistry does not check (a plugin's): Twisted's words.
            problem = f"Twisted cannot build a {kind!r} endpoint from it: {_plain(e)}"
        raise ConfigError("", f"{description!r}: {problem}") from None


def server_endpoint(
    reactor: Any, description: str
) -> tuple[IStreamServerEndpoint, ReloadableTLS | None]:
    """
    The endpoint of a C{listen} entry, and its TLS settings if it is an
    C{ssl:} one.

    @raise ConfigError: for a description or certificate that cannot be used.
    """
    if not description.startswith("ssl:"):
        return _plain_endpoint(reactor, description), None
    args, kwargs = split_description(description)
    unknown = set(kwargs) - _SSL_KEYS
    if unknown:
        raise ConfigError("", f"{description!r}: unknown ssl: option {sorted(unknown)[0]!r}")
    if len(args) != 2 or not args[1].isdigit():
        raise ConfigError("", f"{description!r}: expected ssl:PORT:privateKey=...:certKey=...")
    port = _port(description, args[1], _SYNTAX["ssl"])
    if "privateKey" not in kwargs:
        raise ConfigError("", f"{description!r}: needs privateKey=FILE")
    if "backlog" in kwargs:
        _check_integer(description, "backlog", kwargs["backlog"])
    chain = kwargs.get("extraCertChain")
    tls = ReloadableTLS(
        Path(kwargs.get("certKey", kwargs["privateKey"])),
        Path(kwargs["privateKey"]),
        Path(chain) if chain else None,
    )
    endpoint = SSL4ServerEndpoint(
        reactor,
        port,
        tls,
        backlog=int(kwargs.get("backlog", 50)),
        interface=kwargs.get("interface", ""),
    )
    return endpoint, tls
