"""
txregistry's configuration: the TOML file, its defaults and its validation.

The file is read once at startup with the standard library's C{tomllib}.
Every problem is a L{ConfigError} that names the key and says what is wrong
with it, so that startup can stop with one clear line instead of a
traceback.  C{etc/txregistry.toml} documents every key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from txregistry.config.defaults import builtin_registries, default_cache_directory
from txregistry.config.model import (
    ADDRESS_FAMILIES,
    DOCKER_HUB_NAMES,
    LOG_FORMATS,
    STORAGE_BACKENDS,
    CacheConfig,
    Config,
    ConfigError,
    Credentials,
    FleetConfig,
    LogConfig,
    MirrorConfig,
    ProxyConfig,
    PushUsers,
    RegistryConfig,
    S3Config,
    Secret,
    ServerConfig,
    StorageConfig,
    UpstreamConfig,
)
from txregistry.config.values import (
    normalize_registry_name,
    parse_duration,
    parse_mirror_url,
    parse_proxy_server,
    parse_size,
    proxy_from_environment,
)

T = TypeVar("T")


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


def _segments(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise ValueError(f"expected a whole number from 1 (one stream) to 16, not {value!r}")
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


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of URLs or tables, not {value!r}")
    return value


def _mirrors(table: _Table, environ: Mapping[str, str]) -> tuple[MirrorConfig, ...]:
    """
    A registry's C{mirrors}: URLs, or tables with C{url}, C{resolve_tags}
    and the mirror's own credentials (the same keys as a registry's).
    """
    mirrors = []
    items: list[Any] = table.get("mirrors", _list, [])
    for i, item in enumerate(items):
        where = f"{table.where('mirrors')}[{i}]"
        if isinstance(item, str):
            try:
                mirrors.append(MirrorConfig(parse_mirror_url(item)))
            except ValueError as e:
                raise ConfigError(where, str(e)) from None
            continue
        if not isinstance(item, dict):
            raise ConfigError(where, f"expected a URL or a table, not {item!r}")
        entry = _Table(item, where)
        url = entry.get("url", lambda v: parse_mirror_url(_string(v)), "")
        resolve_tags = entry.get("resolve_tags", _boolean, True)
        credentials = _credentials(entry, environ)
        entry.finish()
        if not url:
            raise ConfigError(entry.where("url"), "is required")
        mirrors.append(MirrorConfig(url, resolve_tags, credentials))
    return tuple(mirrors)


def _upstream(table: _Table, defaults: UpstreamConfig) -> UpstreamConfig:
    """The keys of C{[upstream]}, or a registry's overrides of them."""
    proxy = defaults.proxy
    if "proxy" in table or "no_proxy" in table:
        server = table.get(
            "proxy", lambda v: parse_proxy_server(_string(v)) if v else None, proxy.https
        )
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
        segments=table.get("segments", _segments, defaults.segments),
        segments_above=table.get("segments_above", parse_size, defaults.segments_above),
    )


def _credentials(table: _Table, environ: Mapping[str, str]) -> Credentials | None:
    """
    A registry's or a mirror's user and password: C{username} or
    C{username_env}, with C{password_file} or C{password_env}.
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


def _read_private_file(where: str, path: Path) -> str:
    """
    The text of a file holding secrets, which only its owner may read: one
    its group or others can read is refused, rather than used.
    """
    try:
        mode = path.stat().st_mode
        if mode & 0o044:
            raise ConfigError(
                where,
                f"{str(path)!r} is readable by its group or by other users"
                f" (mode {stat.S_IMODE(mode):04o}): chmod 600 it",
            )
        return path.read_text()
    except OSError as e:
        raise ConfigError(where, f"cannot read {str(path)!r}: {e.strerror or e}") from None


def _read_password_file(table: _Table, path: Path, key: str = "password_file") -> str:
    where = table.where(key)
    password = _read_private_file(where, path).rstrip("\r\n")
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
    mirrors = _mirrors(table, environ)
    hosted = table.get("hosted", _boolean, False)
    push = table.get("push", _boolean, False)
    push_chunk_size = table.get("push_chunk_size", _push_chunk_size, RegistryConfig.push_chunk_size)
    if hosted:
        _check_hosted(table, mirrors, push)
    elif not mirrors:
        raise ConfigError(
            table.where("mirrors"),
            "needs at least one upstream URL (or hosted = true for a registry of its own)",
        )
    elif not any(m.resolve_tags for m in mirrors):
        where = table.where("push" if push else "mirrors")
        raise ConfigError(where, "needs at least one mirror that can resolve tags")
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
        hosted=hosted,
        push=push,
        push_chunk_size=push_chunk_size,
    )
    table.finish()
    return registry


def _check_hosted(table: _Table, mirrors: tuple[MirrorConfig, ...], push: bool) -> None:
    """A hosted registry keeps what is pushed to it: it has nowhere to fetch from."""
    if mirrors or "mirrors" in table:
        raise ConfigError(
            table.where("hosted"),
            "a hosted registry has no mirrors: remove mirrors, or hosted for a pull-through cache",
        )
    if push:
        raise ConfigError(
            table.where("push"),
            "push = true is push-through to mirrors; a hosted registry takes pushes itself",
        )
    for key in _UPSTREAM_ONLY_KEYS:
        if key in table:
            raise ConfigError(
                table.where(key),
                "is about fetching from or pushing to mirrors, and a hosted registry has none:"
                " remove it, or hosted for a pull-through cache",
            )


# Keys that only a registry with mirrors can use.
_UPSTREAM_ONLY_KEYS = (
    "push_chunk_size",
    "username",
    "username_env",
    "password_file",
    "password_env",
    "ca_file",
    "insecure",
    "offline",
    "address_family",
    "proxy",
    "no_proxy",
    "connect_timeout",
    "response_timeout",
    "segments",
    "segments_above",
)


def _push_chunk_size(value: Any) -> int:
    size = parse_size(value)
    if size < 1 << 20:
        raise ValueError(f"must be at least 1MiB, not {value!r}")
    return size


def _networks(value: Any) -> tuple[str, ...]:
    """CIDRs, checked, in the form given (C{10.0.0.0/8}, C{::1/128})."""
    networks = _strings(value)
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not a network such as 10.0.0.0/8") from None
    return networks


def _push_users(table: _Table, key: str) -> PushUsers | None:
    """
    Read C{push_users_file}: C{user:hash} lines of bcrypt hashes (C{htpasswd
    -B}), readable by its owner only, as a C{password_file} must be.
    """
    path = table.get(key, lambda v: Path(_string(v)).expanduser(), None)
    if path is None:
        return None
    where = table.where(key)
    text = _read_private_file(where, path)
    hashes = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, hashed = line.partition(":")
        if not user or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise ConfigError(
                where,
                f"{str(path)!r} line {number}: not user:bcrypt-hash;"
                " write it with htpasswd -B (other hash types are refused)",
            )
        hashes.append((user, Secret(hashed)))
    if not hashes:
        raise ConfigError(where, f"{str(path)!r} holds no users: add one with htpasswd -B")
    return PushUsers(path, tuple(hashes))


# [storage] and [storage.s3] (issue 11).


def _storage(table: _Table, environ: Mapping[str, str]) -> StorageConfig:
    backend = table.get("backend", _string, StorageConfig.backend)
    if backend not in STORAGE_BACKENDS:
        raise ConfigError(
            table.where("backend"), f"must be one of {', '.join(STORAGE_BACKENDS)}, not {backend!r}"
        )
    s3: S3Config | None = None
    if backend == "s3":
        s3 = _s3(table.table("s3"), environ)
    elif "s3" in table:
        table.table("s3")  # allowed, and unused, with the disk backend
    table.finish()
    return StorageConfig(backend, s3)


def _s3(table: _Table, environ: Mapping[str, str]) -> S3Config:
    endpoint = table.get("endpoint", _string, "")
    if not endpoint:
        raise ConfigError(table.where("endpoint"), 'is required with backend = "s3"')
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ConfigError(
            table.where("endpoint"), f"{endpoint!r} is not an http:// or https:// URL"
        )
    if parts.username or parts.password:
        raise ConfigError(
            table.where("endpoint"),
            "must not hold credentials: give access_key_file and secret_key_file instead",
        )
    bucket = table.get("bucket", _string, "")
    if not bucket:
        raise ConfigError(table.where("bucket"), 'is required with backend = "s3"')
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(
            table.where("bucket"),
            f"{bucket!r} is not an S3 bucket name (3 to 63 lower-case letters, digits, '.', '-')",
        )
    prefix = table.get("prefix", _string, "")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    region = table.get("region", _string, "us-east-1")
    aws = (parts.hostname or "").endswith(".amazonaws.com")
    path_style = table.get("path_style", _boolean, not aws)
    ca_file = table.get("ca_file", lambda v: Path(_string(v)).expanduser(), None)
    size_limit = table.get("size_limit", parse_size, None)
    access_key, access_source = _s3_key(table, "access_key", "AWS_ACCESS_KEY_ID", environ)
    secret_key, secret_source = _s3_key(table, "secret_key", "AWS_SECRET_ACCESS_KEY", environ)
    table.finish()
    return S3Config(
        endpoint=endpoint.rstrip("/"),
        bucket=bucket,
        region=region,
        access_key=access_key,
        secret_key=secret_key,
        access_key_source=access_source,
        secret_key_source=secret_source,
        prefix=prefix,
        path_style=path_style,
        ca_file=ca_file,
        size_limit=size_limit,
    )


def _s3_key(
    table: _Table, name: str, default_env: str, environ: Mapping[str, str]
) -> tuple[Secret, str]:
    """An S3 key from C{<name>_file} (private to its owner) or C{<name>_env}."""
    path = table.get(f"{name}_file", lambda v: Path(_string(v)).expanduser(), None)
    variable = table.get(f"{name}_env", _string, "")
    if path is not None and variable:
        raise ConfigError(table.where(f"{name}_env"), f"give {name}_file or {name}_env, not both")
    if path is not None:
        return Secret(_read_password_file(table, path, f"{name}_file")), str(path)
    variable = variable or default_env
    value = environ.get(variable, "")
    if not value:
        raise ConfigError(
            table.where(f"{name}_env"),
            f"${variable} is not set: set it, or give {name}_file",
        )
    return Secret(value), f"${variable}"


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


def _fleet(table: _Table, timing: UpstreamConfig) -> FleetConfig:
    """
    The C{[fleet]} table.  Peers are compared as normalized URLs, so that
    C{http://A:5050/} and C{http://a:5050} are one peer; this node's own
    URL may be in the list (one list for the whole fleet), and is taken out.
    """
    self_url = table.get("self", lambda v: parse_mirror_url(_string(v)), None)
    none: tuple[str, ...] = ()
    listed = table.get("peers", _strings, none)
    peers: list[str] = []
    for i, text in enumerate(listed):
        where = f"{table.where('peers')}[{i}]"
        try:
            url = parse_mirror_url(text)
        except ValueError as e:
            raise ConfigError(where, str(e)) from None
        if url in peers or (url == self_url and listed.index(text) != i):
            raise ConfigError(where, f"{text!r} is listed twice: list each peer once")
        if url != self_url:
            peers.append(url)
    if self_url is None and listed:
        raise ConfigError(
            table.where("self"),
            "is required with peers: set it to this node's URL as its peers reach it,"
            ' as in "http://10.0.0.5:5050"',
        )
    if self_url is not None and not listed:
        raise ConfigError(
            table.where("peers"),
            "is required with self: list the URLs of every node of the fleet",
        )
    return FleetConfig(self_url, tuple(peers), timing)


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
        push_from=server_table.get("push_from", _networks, ServerConfig.push_from),
        push_users=_push_users(server_table, "push_users_file"),
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
        scrub_rate=cache_table.get("scrub_rate", parse_size, CacheConfig.scrub_rate),
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

    fleet_table = top.table("fleet")
    fleet = _fleet(fleet_table, upstream)
    fleet_table.finish()

    storage = _storage(top.table("storage"), environ)

    top.finish()
    return Config(
        server=server,
        cache=cache,
        registries=registries,
        log=log,
        fleet=fleet,
        source=source,
        storage=storage,
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


def default_config(environ: Mapping[str, str] = os.environ) -> Config:
    """The configuration of a plain C{twistd -n txregistry}."""
    return parse_config({}, environ=environ)
