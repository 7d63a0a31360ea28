"""
txregistry's configuration: the TOML file, its defaults and its validation.

The file is read once at startup with the standard library's C{tomllib}.
Every problem is a L{ConfigError} that names the key and says what is wrong
with it, so that startup can stop with one clear line instead of a
traceback.  C{etc/txregistry.toml} documents every key.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

T = TypeVar("T")

DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_SIZE_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_HOST_RE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::\d{1,5})?"
)


class ConfigError(Exception):
    """A problem with the configuration, naming the key it concerns."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class ServerConfig:
    """
    @ivar admin_listen: where admin requests (offline mode) are served; an
        empty tuple turns them off.
    @ivar header_timeout: how long a client has to send a request's headers,
        counted from its first byte, so that a trickle cannot hold a
        connection for ever.
    @ivar idle_timeout: how long an idle connection is kept.
    @ivar shutdown_timeout: how long a stop waits for downloads in progress
        to finish before it drops them.
    """

    listen: tuple[str, ...] = ("tcp:5050:interface=127.0.0.1",)
    admin_listen: tuple[str, ...] = ("tcp:5051:interface=127.0.0.1",)
    header_timeout: float = 30.0
    idle_timeout: float = 300.0
    shutdown_timeout: float = 30.0


LOG_FORMATS = ("auto", "text", "json", "journal")


@dataclass(frozen=True)
class LogConfig:
    """
    @ivar format: C{text} (twistd's own), C{json} (one object per line on
        standard output), C{journal} (systemd's journal, with fields), or
        C{auto}: the journal when systemd connected our output to it, text
        otherwise.
    @ivar access_log: one line per request.
    """

    format: str = "auto"
    access_log: bool = True


@dataclass(frozen=True)
class CacheConfig:
    """
    @ivar negative_ttl: how long a tag the upstream said does not exist is
        remembered as missing.
    @ivar fill_after_disconnect: whether a download goes on when every
        client that wanted it has gone, so that the next pull is a hit.
    """

    directory: Path
    size_limit: int = 20 << 30
    tag_ttl: float = 300.0
    negative_ttl: float = 15.0
    fill_after_disconnect: bool = True


class Secret:
    """
    A password or token.  Its C{repr} and C{str} never show it, so that no
    log line, error or dump of the config can.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ProxyServer:
    """An HTTP proxy, and the Basic credentials it wants, if any."""

    host: str
    port: int
    authorization: Secret | None = None

    @property
    def display(self) -> str:
        """The proxy's address, safe to log."""
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class ProxyConfig:
    """
    Which upstream requests go through an HTTP proxy.

    @ivar http: the proxy for C{http://} upstreams (absolute-form requests).
    @ivar https: the proxy for C{https://} upstreams (CONNECT tunnels).
    @ivar no_proxy: hosts, domains (C{.example.com}) and networks
        (C{10.0.0.0/8}) reached directly; C{*} means all.
    """

    http: ProxyServer | None = None
    https: ProxyServer | None = None
    no_proxy: tuple[str, ...] = ()

    def for_url(self, scheme: str, host: str) -> ProxyServer | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or _bypasses_proxy(host, self.no_proxy):
            return None
        return proxy


def _bypasses_proxy(host: str, no_proxy: tuple[str, ...]) -> bool:
    host = host.lower().strip("[]")
    for entry in no_proxy:
        entry = entry.lower().strip()
        if entry == "*":
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        except ValueError:
            pass
        domain = entry.lstrip(".").split(":")[0]
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


@dataclass(frozen=True)
class UpstreamConfig:
    """
    How upstreams are reached: the C{[upstream]} table, which a registry can
    override in part.
    """

    connect_timeout: float = 5.0
    response_timeout: float = 30.0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    backoff_initial: float = 10.0
    backoff_max: float = 300.0
    body_timeout: float = 30.0
    resume_attempts: int = 3


@dataclass(frozen=True)
class Credentials:
    """
    A registry user and password.  C{source} says where the password came
    from, for logs; the password itself is a L{Secret}.
    """

    username: str
    password: Secret
    source: str


ADDRESS_FAMILIES = ("ipv4", "ipv6", "any")


@dataclass(frozen=True)
class MirrorConfig:
    """
    One upstream URL of a registry, such as C{https://registry-1.docker.io}.

    @ivar resolve_tags: whether it may be asked what a tag means.  A mirror
        that may not is asked only for content by digest, which txregistry
        verifies, so it cannot swap an image behind a tag.  Such a mirror is
        also never sent the registry's credentials.
    """

    url: str
    resolve_tags: bool = True

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


@dataclass(frozen=True)
class RegistryConfig:
    """
    A registry clients can pull from through txregistry.

    @ivar name: the name clients use for it (C{docker.io}, C{ghcr.io}).
    @ivar aliases: other names that select the same registry.
    @ivar mirrors: the upstreams to fetch from, in order.
    @ivar default: whether requests that name no registry go here.
    @ivar address_family: C{"ipv4"}, C{"ipv6"} or C{"any"}: which addresses
        of upstream hosts are resolved and connected to.
    @ivar ca_file: CA certificates to trust for the mirrors' TLS, instead of
        the system's.
    @ivar insecure: do not verify the mirrors' TLS certificates.
    @ivar offline: serve only what is cached, asking no upstream; admin
        requests can change it at runtime.
    """

    name: str
    mirrors: tuple[MirrorConfig, ...]
    aliases: tuple[str, ...] = ()
    default: bool = False
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    address_family: str = "ipv4"
    ca_file: Path | None = None
    insecure: bool = False
    credentials: Credentials | None = None
    offline: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that selects this registry."""
        return (self.name, *self.aliases)

    @property
    def is_docker_hub(self) -> bool:
        """
        Docker Hub keeps official images under C{library/}, and clients
        leave that out: C{alpine} means C{library/alpine}.
        """
        return not DOCKER_HUB_NAMES.isdisjoint(self.names)


@dataclass(frozen=True)
class Config:
    """
    The whole configuration.

    @ivar source: the file it was read from, or L{None} for the built-in
        defaults.
    """

    cache: CacheConfig
    registries: tuple[RegistryConfig, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str | None = None

    @property
    def default_registry(self) -> RegistryConfig | None:
        for registry in self.registries:
            if registry.default:
                return registry
        return None


def default_cache_directory(
    environ: Mapping[str, str] = os.environ, euid: int | None = None
) -> Path:
    """
    Where the cache goes when the config does not say: systemd's
    C{CacheDirectory=} when it set one, C{/var/cache/txregistry} for root,
    and the XDG cache directory of anyone else, so that a plain
    C{twistd -n txregistry} works for any user.
    """
    if environ.get("CACHE_DIRECTORY"):
        return Path(environ["CACHE_DIRECTORY"].split(":")[0])
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/cache/txregistry")
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(environ.get("HOME", "~")).expanduser() / ".cache"
    return base / "txregistry"


def builtin_registries() -> tuple[RegistryConfig, ...]:
    """The registry used when the config names none: Docker Hub, direct."""
    return (
        RegistryConfig(
            name="docker.io",
            aliases=("index.docker.io", "registry-1.docker.io"),
            mirrors=(MirrorConfig("https://registry-1.docker.io"),),
            default=True,
        ),
    )


def default_config(environ: Mapping[str, str] = os.environ) -> Config:
    """The configuration of a plain C{twistd -n txregistry}."""
    return parse_config({}, environ=environ)


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
    if not name or _HOST_RE.fullmatch(name) is None:
        raise ValueError(f"{text!r} is not a registry host name")
    return name


def _proxy_server(text: str) -> ProxyServer:
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
            return _proxy_server(value) if value else None
        except ValueError as e:
            raise ConfigError(f"${spelling}", str(e)) from None

    no_proxy = variable("no_proxy")[1]
    return ProxyConfig(
        http=server("http_proxy"),
        https=server("https_proxy"),
        no_proxy=tuple(e.strip() for e in no_proxy.split(",") if e.strip()),
    )


def _mirror_url(text: str) -> str:
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


class _Table:
    """
    One TOML table being read: hands out its keys with type checks, and
    complains about any key nobody asked for.
    """

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(where, "must be a table")
        self._data: dict[str, Any] = data
        self._where = where
        self._used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def get(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        self._used.add(key)
        if key not in self._data:
            return default
        try:
            return convert(self._data[key])
        except ValueError as e:
            raise ConfigError(self.where(key), str(e)) from None

    def table(self, key: str) -> _Table:
        self._used.add(key)
        return _Table(self._data.get(key, {}), self.where(key))

    def tables(self, key: str) -> list[_Table] | None:
        self._used.add(key)
        if key not in self._data:
            return None
        value = self._data[key]
        if not isinstance(value, list):
            raise ConfigError(self.where(key), "must be an array of tables ([[...]])")
        return [_Table(item, f"{self.where(key)}[{i}]") for i, item in enumerate(value)]

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(self.where(unknown[0]), "unknown key")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, not {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, not {value!r}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list):
        raise ValueError(f"expected a list of strings, not {value!r}")
    return tuple(_string(item) for item in value)


def _listen(value: Any) -> tuple[str, ...]:
    descriptions = _strings(value)
    if not descriptions:
        raise ValueError("needs at least one endpoint description")
    return descriptions


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def _log_format(value: Any) -> str:
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}, not {value!r}")
    return str(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number, 0 or more, not {value!r}")
    return value


def _address_family(value: Any) -> str:
    if value not in ADDRESS_FAMILIES:
        raise ValueError(f"must be one of {', '.join(ADDRESS_FAMILIES)}, not {value!r}")
    return str(value)


def _existing_file(value: Any) -> Path:
    path = Path(_string(value)).expanduser()
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a readable file")
    return path


def _mirrors(value: Any) -> tuple[MirrorConfig, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of URLs or tables, not {value!r}")
    mirrors = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            mirrors.append(MirrorConfig(_mirror_url(item)))
            continue
        if not isinstance(item, dict):
            raise ValueError(f"entry {i}: expected a URL or a table, not {item!r}")
        try:
            entry = _Table(item, "")
            url = entry.get("url", lambda v: _mirror_url(_string(v)), "")
            resolve_tags = entry.get("resolve_tags", _boolean, True)
            entry.finish()
        except ConfigError as e:
            raise ValueError(f"entry {i}: {e.where}: {e.problem}") from None
        if not url:
            raise ValueError(f"entry {i} needs a url")
        mirrors.append(MirrorConfig(url, resolve_tags))
    return tuple(mirrors)


def _upstream(table: _Table, defaults: UpstreamConfig) -> UpstreamConfig:
    """The keys of C{[upstream]}, or a registry's overrides of them."""
    proxy = defaults.proxy
    if "proxy" in table or "no_proxy" in table:
        server = table.get("proxy", lambda v: _proxy_server(_string(v)) if v else None, proxy.https)
        no_proxy = table.get("no_proxy", _strings, proxy.no_proxy)
        if "proxy" in table:
            proxy = ProxyConfig(http=server, https=server, no_proxy=no_proxy)
        else:
            proxy = ProxyConfig(http=proxy.http, https=proxy.https, no_proxy=no_proxy)
    return UpstreamConfig(
        connect_timeout=table.get("connect_timeout", _positive_duration, defaults.connect_timeout),
        response_timeout=table.get(
            "response_timeout", _positive_duration, defaults.response_timeout
        ),
        proxy=proxy,
        backoff_initial=defaults.backoff_initial,
        backoff_max=defaults.backoff_max,
        body_timeout=defaults.body_timeout,
        resume_attempts=defaults.resume_attempts,
    )


def _credentials(table: _Table, environ: Mapping[str, str]) -> Credentials | None:
    """
    A registry's user and password: C{username} or C{username_env}, with
    C{password_file} or C{password_env}.
    """
    username = table.get("username", _string, "")
    username_env = table.get("username_env", _string, "")
    password_file = table.get("password_file", lambda v: Path(_string(v)).expanduser(), None)
    password_env = table.get("password_env", _string, "")
    if username and username_env:
        raise ConfigError(table.where("username_env"), "give username or username_env, not both")
    if password_file and password_env:
        raise ConfigError(
            table.where("password_env"), "give password_file or password_env, not both"
        )
    if username_env:
        username = environ.get(username_env, "")
        if not username:
            raise ConfigError(table.where("username_env"), f"${username_env} is not set")
    has_password = bool(password_file or password_env)
    if not username and not has_password:
        return None
    if not username:
        raise ConfigError(table.where("username"), "is required with a password")
    if not has_password:
        raise ConfigError(
            table.where("password_file"), "a username needs password_file or password_env"
        )
    if password_env:
        password = environ.get(password_env, "")
        if not password:
            raise ConfigError(table.where("password_env"), f"${password_env} is not set")
        return Credentials(username, Secret(password), f"${password_env}")
    assert password_file is not None
    return Credentials(
        username, Secret(_read_password_file(table, password_file)), str(password_file)
    )


def _read_password_file(table: _Table, path: Path) -> str:
    where = table.where("password_file")
    try:
        mode = path.stat().st_mode
        if mode & 0o044:
            raise ConfigError(
                where,
                f"{str(path)!r} is readable by its group or by other users"
                f" (mode {stat.S_IMODE(mode):04o}): chmod 600 it",
            )
        password = path.read_text().rstrip("\r\n")
    except OSError as e:
        raise ConfigError(where, f"cannot read {str(path)!r}: {e.strerror or e}") from None
    if not password:
        raise ConfigError(where, f"{str(path)!r} is empty")
    return password


def _registry(
    table: _Table, upstream: UpstreamConfig, environ: Mapping[str, str]
) -> RegistryConfig:
    name = table.get("name", lambda v: normalize_registry_name(_string(v)), "")
    if not name:
        raise ConfigError(table.where("name"), "is required")
    no_aliases: tuple[str, ...] = ()
    aliases = table.get(
        "aliases", lambda v: tuple(normalize_registry_name(a) for a in _strings(v)), no_aliases
    )
    no_mirrors: tuple[MirrorConfig, ...] = ()
    mirrors = table.get("mirrors", _mirrors, no_mirrors)
    if not mirrors:
        raise ConfigError(table.where("mirrors"), "needs at least one upstream URL")
    if not any(m.resolve_tags for m in mirrors):
        raise ConfigError(table.where("mirrors"), "needs at least one mirror that can resolve tags")
    names = {name, *aliases}
    registry = RegistryConfig(
        name=name,
        aliases=aliases,
        mirrors=mirrors,
        default=table.get("default", _boolean, not DOCKER_HUB_NAMES.isdisjoint(names)),
        upstream=_upstream(table, upstream),
        address_family=table.get("address_family", _address_family, "ipv4"),
        ca_file=table.get("ca_file", _existing_file, None),
        insecure=table.get("insecure", _boolean, False),
        credentials=_credentials(table, environ),
        offline=table.get("offline", _boolean, False),
    )
    table.finish()
    return registry


def _check_registries(registries: list[RegistryConfig], where: str) -> None:
    seen: dict[str, str] = {}
    for registry in registries:
        for name in registry.names:
            if name in seen and seen[name] != registry.name:
                raise ConfigError(
                    where, f"{name!r} names both {seen[name]!r} and {registry.name!r}"
                )
            seen[name] = registry.name
    defaults = [r.name for r in registries if r.default]
    if len(defaults) > 1:
        raise ConfigError(where, f"only one registry can be the default, not {defaults}")


def parse_config(
    data: dict[str, Any], source: str | None = None, environ: Mapping[str, str] = os.environ
) -> Config:
    """
    Build a L{Config} from parsed TOML, filling in the defaults, some of
    which (proxies, the cache directory, passwords) come from C{environ}.
    """
    top = _Table(data, "")

    server_table = top.table("server")
    server = ServerConfig(
        listen=server_table.get("listen", _listen, ServerConfig.listen),
        admin_listen=server_table.get("admin_listen", _strings, ServerConfig.admin_listen),
        header_timeout=server_table.get(
            "header_timeout", _positive_duration, ServerConfig.header_timeout
        ),
        idle_timeout=server_table.get(
            "idle_timeout", _positive_duration, ServerConfig.idle_timeout
        ),
        shutdown_timeout=server_table.get(
            "shutdown_timeout", parse_duration, ServerConfig.shutdown_timeout
        ),
    )
    server_table.finish()

    log_table = top.table("log")
    log = LogConfig(
        format=log_table.get("format", _log_format, LogConfig.format),
        access_log=log_table.get("access_log", _boolean, LogConfig.access_log),
    )
    log_table.finish()

    cache_table = top.table("cache")
    directory = cache_table.get(
        "directory", lambda v: Path(_string(v)).expanduser(), default_cache_directory(environ)
    )
    cache = CacheConfig(
        directory=directory,
        size_limit=cache_table.get("size_limit", parse_size, CacheConfig.size_limit),
        tag_ttl=cache_table.get("tag_ttl", parse_duration, CacheConfig.tag_ttl),
        negative_ttl=cache_table.get("negative_ttl", parse_duration, CacheConfig.negative_ttl),
        fill_after_disconnect=cache_table.get(
            "fill_after_disconnect", _boolean, CacheConfig.fill_after_disconnect
        ),
    )
    cache_table.finish()

    upstream_table = top.table("upstream")
    defaults = UpstreamConfig(
        proxy=proxy_from_environment(environ),
        backoff_initial=upstream_table.get(
            "backoff_initial", _positive_duration, UpstreamConfig.backoff_initial
        ),
        backoff_max=upstream_table.get(
            "backoff_max", _positive_duration, UpstreamConfig.backoff_max
        ),
        body_timeout=upstream_table.get(
            "body_timeout", _positive_duration, UpstreamConfig.body_timeout
        ),
        resume_attempts=upstream_table.get(
            "resume_attempts", _count, UpstreamConfig.resume_attempts
        ),
    )
    upstream = _upstream(upstream_table, defaults)
    upstream_table.finish()

    registry_tables = top.tables("registry")
    if registry_tables is None:
        registries = tuple(replace(r, upstream=upstream) for r in builtin_registries())
    else:
        if not registry_tables:
            raise ConfigError("registry", "needs at least one [[registry]]")
        parsed = [_registry(table, upstream, environ) for table in registry_tables]
        _check_registries(parsed, "registry")
        registries = tuple(parsed)

    top.finish()
    return Config(
        server=server,
        cache=cache,
        registries=registries,
        upstream=upstream,
        log=log,
        source=source,
    )


def load_config(path: str, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, f"cannot read config file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"not valid TOML: {e}") from None
    try:
        return parse_config(data, source=path, environ=environ)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.where}" if e.where else path, e.problem) from None
