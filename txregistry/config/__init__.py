"""
txregistry's configuration: the TOML file, its defaults and its validation.

 - L{model}: what the rest of txregistry reads, as frozen dataclasses;
 - L{values}: how one key's value is parsed (sizes, durations, URLs);
 - L{defaults}: what applies where the file says nothing;
 - L{parse}: reading the file, table by table, into a L{Config}.
"""

from txregistry.config.defaults import builtin_registries, default_cache_directory
from txregistry.config.model import (
    ADDRESS_FAMILIES,
    DOCKER_HUB_NAMES,
    DOCKER_HUB_REGISTRY_HOSTS,
    LOG_FORMATS,
    CacheConfig,
    Config,
    ConfigError,
    Credentials,
    FleetConfig,
    LogConfig,
    MirrorConfig,
    ProxyConfig,
    ProxyServer,
    PushUsers,
    RegistryConfig,
    S3Config,
    Secret,
    ServerConfig,
    StorageConfig,
    UpstreamConfig,
)
from txregistry.config.parse import default_config, load_config, parse_config
from txregistry.config.values import (
    normalize_registry_name,
    parse_duration,
    parse_size,
    proxy_from_environment,
)

__all__ = [
    "ADDRESS_FAMILIES",
    "DOCKER_HUB_NAMES",
    "DOCKER_HUB_REGISTRY_HOSTS",
    "LOG_FORMATS",
    "CacheConfig",
    "Config",
    "ConfigError",
    "Credentials",
    "FleetConfig",
    "LogConfig",
    "MirrorConfig",
    "ProxyConfig",
    "ProxyServer",
    "PushUsers",
    "RegistryConfig",
    "S3Config",
    "Secret",
    "ServerConfig",
    "StorageConfig",
    "UpstreamConfig",
    "builtin_registries",
    "default_cache_directory",
    "default_config",
    "load_config",
    "normalize_registry_name",
    "parse_config",
    "parse_duration",
    "parse_size",
    "proxy_from_environment",
]
