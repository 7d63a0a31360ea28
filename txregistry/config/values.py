"""
Parsing the values of configuration keys: sizes, durations, registry names,
mirror URLs and proxy settings.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from txregistry.config.model import ConfigError, ProxyConfig, ProxyServer, Secret
from txregistry.oci.reference import HOST_RE

_SIZE_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_size(text: object) -> int:
    """Parse C{"20GiB"}, C{"512 MiB"} or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("must not be negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f'expected a size such as "20GiB", not {text!r}')
    match = _SIZE_RE.fullmatch(text)
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(
            f'{text!r} is not a size: use a number with KiB, MiB, GiB or TiB, as in "20GiB"'
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_duration(text: object) -> float:
    """Parse C{"5m"}, C{"1h30m"}, C{"500ms"} or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0 or not math.isfinite(text):
            raise ValueError("must be a finite number of seconds, not negative")
        return float(text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f'expected a duration such as "5m", not {text!r}')
    compact = text.replace(" ", "")
    parts = _DURATION_PART_RE.findall(compact)
    if "".join(number + unit for number, unit in parts) != compact:
        raise ValueError(
            f'{text!r} is not a duration: use a number with ms, s, m, h or d, as in "5m"'
        )
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def normalize_registry_name(text: str) -> str:
    """
    Reduce the ways people write a registry to its host name:
    C{https://index.docker.io/v1/} and C{Index.Docker.io} both become
    C{index.docker.io}.  Raise L{ValueError} if it is not a host name.
    """
    name = text.strip().lower()
    if "://" in name:
        name = urlsplit(name).netloc
    name = name.split("/", 1)[0]
    if not name or HOST_RE.fullmatch(name) is None:
        raise ValueError(f"{text!r} is not a registry host name")
    return name


def parse_proxy_server(text: str) -> ProxyServer:
    """Parse C{http://[user:password@]host:port}."""
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme != "http":
        raise ValueError(f"proxy {_without_userinfo(text)!r} must be an http:// URL")
    if not parts.hostname:
        raise ValueError(f"proxy {_without_userinfo(text)!r} has no host")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"proxy {_without_userinfo(text)!r} has an invalid port") from None
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = Secret("Basic " + base64.b64encode(pair.encode()).decode("ascii"))
    return ProxyServer(parts.hostname, port, authorization)


def _without_userinfo(text: str) -> str:
    return re.sub(r"//[^@/]*@", "//", text)


def proxy_from_environment(environ: Mapping[str, str]) -> ProxyConfig:
    """
    The proxy settings of C{HTTPS_PROXY}, C{HTTP_PROXY} and C{NO_PROXY}
    (lower case wins, as in curl and Python's urllib).
    """

    def variable(name: str) -> tuple[str, str]:
        for spelling in (name.lower(), name.upper()):
            if environ.get(spelling):
                return spelling, environ[spelling]
        return name, ""

    def server(name: str) -> ProxyServer | None:
        spelling, value = variable(name)
        try:
            return parse_proxy_server(value) if value else None
        except ValueError as e:
            raise ConfigError(f"${spelling}", str(e)) from None

    no_proxy = variable("no_proxy")[1]
    return ProxyConfig(
        http=server("http_proxy"),
        https=server("https_proxy"),
        no_proxy=tuple(e.strip() for e in no_proxy.split(",") if e.strip()),
    )


def parse_mirror_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r} must start with https:// or http://")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text!r} must be a bare scheme://host[:port], with no path")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc.lower()}"
