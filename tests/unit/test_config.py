"""Reading and validating the TOML config."""

import dataclasses
import re
from pathlib import Path

import pytest

from txregistry.config import (
    CacheConfig,
    Config,
    ConfigError,
    MirrorConfig,
    RegistryConfig,
    ServerConfig,
    default_cache_directory,
    default_config,
    load_config,
    normalize_registry_name,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).parents[2]


def write(tmp_path, text):
    path = tmp_path / "txregistry.toml"
    path.write_text(text)
    return str(path)


def config_error(tmp_path, text):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


def test_full_config(tmp_path):
    path = write(
        tmp_path,
        """
        [server]
        listen = ["tcp:5050:interface=127.0.0.1", "tcp6:5051:interface=\\\\:\\\\:1"]
        [cache]
        directory = "/srv/cache"
        size_limit = "1.5GiB"
        tag_ttl = "1m30s"
        [[registry]]
        name = "Docker.IO"
        aliases = ["index.docker.io", "https://registry-1.docker.io/v2/"]
        mirrors = ["https://registry-1.docker.io/", "http://10.0.0.1:5000"]
        [[registry]]
        name = "ghcr.io"
        mirrors = ["https://ghcr.io"]
        """,
    )
    assert load_config(path) == Config(
        server=ServerConfig(listen=("tcp:5050:interface=127.0.0.1", "tcp6:5051:interface=\\:\\:1")),
        cache=CacheConfig(directory=Path("/srv/cache"), size_limit=int(1.5 * 2**30), tag_ttl=90.0),
        registries=(
            RegistryConfig(
                "docker.io",
                (
                    MirrorConfig("https://registry-1.docker.io"),
                    MirrorConfig("http://10.0.0.1:5000"),
                ),
                aliases=("index.docker.io", "registry-1.docker.io"),
                default=True,
            ),
            RegistryConfig("ghcr.io", (MirrorConfig("https://ghcr.io"),), default=False),
        ),
        source=path,
    )


def test_empty_file_means_builtin_defaults(tmp_path):
    loaded = load_config(write(tmp_path, ""))
    assert dataclasses.replace(loaded, source=None) == default_config()


def test_builtin_defaults():
    config = default_config()
    assert config.server.listen == ("tcp:5050:interface=127.0.0.1",)
    assert config.cache.size_limit == 20 * 2**30 and config.cache.tag_ttl == 300
    (hub,) = config.registries
    assert (hub.name, hub.mirrors, hub.default, hub.is_docker_hub) == (
        "docker.io",
        (MirrorConfig("https://registry-1.docker.io"),),
        True,
        True,
    )


def test_shipped_config_parses_and_documents_every_key():
    path = ROOT / "etc" / "txregistry.toml"
    config = load_config(str(path))
    assert config.default_registry is not None and config.default_registry.name == "docker.io"
    text = path.read_text()
    documented = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, re.MULTILINE))
    for section in (ServerConfig, CacheConfig, RegistryConfig):
        for f in dataclasses.fields(section):
            assert f.name in documented, f"{f.name} is not documented in etc/txregistry.toml"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[cache]\nsise_limit = 1", "cache.sise_limit: unknown key"),
        ("colour = 1", "colour: unknown key"),
        ('[cache]\nsize_limit = "20GB"', "cache.size_limit: '20GB' is not a size"),
        ("[cache]\nsize_limit = -1", "cache.size_limit: must not be negative"),
        ('[cache]\ntag_ttl = "soon"', "cache.tag_ttl: 'soon' is not a duration"),
        ('[server]\nlisten = "tcp:5050"', "server.listen: expected a list of strings"),
        ("[server]\nlisten = []", "server.listen: needs at least one"),
        ('[[registry]]\nname = "x.io"', "registry[0].mirrors: needs at least one upstream URL"),
        ('[[registry]]\nmirrors = ["https://x.io"]', "registry[0].name: is required"),
        (
            '[[registry]]\nname = "x.io"\nmirrors = ["ftp://x.io"]',
            "registry[0].mirrors: 'ftp://x.io' must start with https://",
        ),
        ('[[registry]]\nname = "x.io"\nmirrors = ["https://x.io/v2/proxy"]', "with no path"),
        (
            '[[registry]]\nname = "x.io"\nmirrors = ["https://x.io"]\nmirror = []',
            "registry[0].mirror: unknown key",
        ),
        (
            '[[registry]]\nname = "not a host"\nmirrors = ["https://x.io"]',
            "registry[0].name: 'not a host' is not a registry host name",
        ),
        (
            '[[registry]]\nname = "x.io"\nmirrors = ["https://x.io"]\ndefault = "yes"',
            "registry[0].default: expected true or false",
        ),
        ("registry = []", "registry: needs at least one [[registry]]"),
        ("[cache]\ndirectory = 5", "cache.directory: expected a string"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    error = config_error(tmp_path, text)
    assert message in error
    assert error.startswith(str(tmp_path / "txregistry.toml") + ": ")
    assert "\n" not in error


def test_two_defaults_and_shared_names_are_refused(tmp_path):
    two = """
        [[registry]]
        name = "a.io"
        mirrors = ["https://a.io"]
        default = true
        [[registry]]
        name = "b.io"
        mirrors = ["https://b.io"]
        default = true
    """
    assert "only one registry can be the default" in config_error(tmp_path, two)
    shared = """
        [[registry]]
        name = "a.io"
        mirrors = ["https://a.io"]
        [[registry]]
        name = "b.io"
        aliases = ["A.io"]
        mirrors = ["https://b.io"]
    """
    assert "'a.io' names both 'a.io' and 'b.io'" in config_error(tmp_path, shared)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "missing.toml"))
    assert "cannot read config file: No such file or directory" in str(caught.value)
    assert "not valid TOML" in config_error(tmp_path, "[cache\n")


@pytest.mark.parametrize(
    "text, size",
    [
        (0, 0),
        (1234, 1234),
        ("1234", 1234),
        ("10KiB", 10240),
        ("2 MiB", 2 << 20),
        ("20GiB", 20 << 30),
        ("1TiB", 1 << 40),
        ("100B", 100),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text, seconds",
    [
        (0, 0.0),
        (15, 15.0),
        (2.5, 2.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1d", 86400.0),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "1h-5m", True, float("inf"), -1])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, name",
    [
        ("docker.io", "docker.io"),
        ("https://index.docker.io/v1/", "index.docker.io"),
        ("Quay.IO", "quay.io"),
        ("localhost:5000", "localhost:5000"),
    ],
)
def test_registry_names_normalize(text, name):
    assert normalize_registry_name(text) == name


def test_default_cache_directory():
    assert default_cache_directory(
        {"CACHE_DIRECTORY": "/var/cache/txregistry:/other"}, euid=1000
    ) == Path("/var/cache/txregistry")
    assert default_cache_directory({}, euid=0) == Path("/var/cache/txregistry")
    assert default_cache_directory({"XDG_CACHE_HOME": "/x"}, euid=1000) == Path("/x/txregistry")
    assert default_cache_directory({"HOME": "/home/u"}, euid=1000) == Path(
        "/home/u/.cache/txregistry"
    )
