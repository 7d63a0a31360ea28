"""
txregistry's configuration: the TOML file, its defaults and its validation.

The file is read once at startup with the standard library's C{tomllib}.
Every problem is a L{ConfigError} that names the key and says what is wrong
with it, so that startup can stop with one clear line instead of a
traceback.  C{etc/txregistry.toml} documents every key.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

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
    listen: tuple[str, ...] = ("tcp:5050:interface=127.0.0.1",)


@dataclass(frozen=True)
class CacheConfig:
    directory: Path
    size_limit: int = 20 << 30
    tag_ttl: float = 300.0


@dataclass(frozen=True)
class MirrorConfig:
    """One upstream URL of a registry, such as C{https://registry-1.docker.io}."""

    url: str


@dataclass(frozen=True)
class RegistryConfig:
    """
    A registry clients can pull from through txregistry.

    @ivar name: the name clients use for it (C{docker.io}, C{ghcr.io}).
    @ivar aliases: other names that select the same registry.
    @ivar mirrors: the upstreams to fetch from, in order.
    @ivar default: whether requests that name no registry go here.
    """

    name: str
    mirrors: tuple[MirrorConfig, ...]
    aliases: tuple[str, ...] = ()
    default: bool = False

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


def default_config() -> Config:
    """The configuration of a plain C{twistd -n txregistry}."""
    return Config(
        cache=CacheConfig(directory=default_cache_directory()),
        registries=builtin_registries(),
    )


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


def _registry(table: _Table) -> RegistryConfig:
    name = table.get("name", lambda v: normalize_registry_name(_string(v)), "")
    if not name:
        raise ConfigError(table.where("name"), "is required")
    no_aliases: tuple[str, ...] = ()
    aliases = table.get(
        "aliases", lambda v: tuple(normalize_registry_name(a) for a in _strings(v)), no_aliases
    )
    no_mirrors: tuple[MirrorConfig, ...] = ()
    mirrors = table.get(
        "mirrors", lambda v: tuple(MirrorConfig(_mirror_url(m)) for m in _strings(v)), no_mirrors
    )
    if not mirrors:
        raise ConfigError(table.where("mirrors"), "needs at least one upstream URL")
    names = {name, *aliases}
    default = table.get("default", _boolean, not DOCKER_HUB_NAMES.isdisjoint(names))
    table.finish()
    return RegistryConfig(name=name, aliases=aliases, mirrors=mirrors, default=default)


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


def parse_config(data: dict[str, Any], source: str | None = None) -> Config:
    """Build a L{Config} from parsed TOML, filling in the defaults."""
    top = _Table(data, "")

    server_table = top.table("server")
    server = ServerConfig(listen=server_table.get("listen", _listen, ServerConfig.listen))
    server_table.finish()

    cache_table = top.table("cache")
    directory = cache_table.get(
        "directory", lambda v: Path(_string(v)).expanduser(), default_cache_directory()
    )
    cache = CacheConfig(
        directory=directory,
        size_limit=cache_table.get("size_limit", parse_size, CacheConfig.size_limit),
        tag_ttl=cache_table.get("tag_ttl", parse_duration, CacheConfig.tag_ttl),
    )
    cache_table.finish()

    registry_tables = top.tables("registry")
    if registry_tables is None:
        registries = builtin_registries()
    else:
        if not registry_tables:
            raise ConfigError("registry", "needs at least one [[registry]]")
        parsed = [_registry(table) for table in registry_tables]
        _check_registries(parsed, "registry")
        registries = tuple(parsed)

    top.finish()
    return Config(server=server, cache=cache, registries=registries, source=source)


def load_config(path: str) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, f"cannot read config file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"not valid TOML: {e}") from None
    try:
        return parse_config(data, source=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.where}" if e.where else path, e.problem) from None
