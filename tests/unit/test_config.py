"""Reading and validating the TOML config."""

import dataclasses
import re
from pathlib import Path

import pytest

from txregistry.config import (
    CacheConfig,
    Config,
    ConfigError,
    Credentials,
    FleetConfig,
    MirrorConfig,
    ProxyConfig,
    ProxyServer,
    RegistryConfig,
    Secret,
    ServerConfig,
    default_cache_directory,
    default_config,
    load_config,
    normalize_registry_name,
    parse_duration,
    parse_size,
)
from txregistry.config import parse as config_module

ROOT = Path(__file__).parents[2]


def write(tmp_path, text):
    path = tmp_path / "txregistry.toml"
    path.write_text(text)
    return str(path)


def config_error(tmp_path, text, environ=None):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ=environ or {})
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
    assert load_config(path, environ={}) == Config(
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
    loaded = load_config(write(tmp_path, ""), environ={})
    assert dataclasses.replace(loaded, source=None) == default_config(environ={})


def test_builtin_defaults():
    config = default_config(environ={})
    assert config.server.listen == ("tcp:5050:interface=127.0.0.1",)
    assert config.cache.size_limit == 20 * 2**30 and config.cache.tag_ttl == 300
    (hub,) = config.registries
    assert (hub.name, hub.mirrors, hub.default, hub.is_docker_hub) == (
        "docker.io",
        (MirrorConfig("https://registry-1.docker.io"),),
        True,
        True,
    )


def test_shipped_config_parses_and_documents_every_key(monkeypatch):
    path = ROOT / "etc" / "txregistry.toml"
    asked = set()
    get = config_module._Table.get

    def recording_get(self, key, convert, default):
        asked.add(key)
        return get(self, key, convert, default)

    # Every key of the schema is asked for, present or not: that is how
    # defaults are applied.
    monkeypatch.setattr(config_module._Table, "get", recording_get)
    config = load_config(str(path), environ={})
    assert config.default_registry is not None and config.default_registry.name == "docker.io"
    # [storage.s3] is read only with backend = "s3", which the shipped file
    # documents commented out.
    s3 = {"endpoint": "http://127.0.0.1:9000", "bucket": "txregistry"}
    keys = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}
    config_module.parse_config({"storage": {"backend": "s3", "s3": s3}}, environ=keys)

    text = path.read_text()
    documented = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, re.MULTILINE))
    # Keys of mirror tables are documented as a list: "#   url   the ...".
    documented |= set(re.findall(r"^#\s{3}([a-z_]+)\s{2,}", text, re.MULTILINE))
    assert asked - documented == set(), "accepted but not documented"
    assert documented - asked == set(), "documented but not accepted"


def test_shipped_failover_list():
    config = load_config(str(ROOT / "etc" / "txregistry.toml"), environ={})
    (hub,) = config.registries
    assert hub.mirrors == (
        MirrorConfig("https://registry-1.docker.io", resolve_tags=True),
        MirrorConfig("https://docker.m.daocloud.io", resolve_tags=False),
        MirrorConfig("https://registry.dockermirror.com", resolve_tags=False),
    )
    # Without a config file: registry-1.docker.io alone.
    (builtin,) = default_config(environ={}).registries
    assert builtin.mirrors == (MirrorConfig("https://registry-1.docker.io"),)


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
            "registry[0].mirrors[0]: 'ftp://x.io' must start with https://",
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


def registry_of(tmp_path, text, environ=None):
    config = load_config(write(tmp_path, text), environ=environ or {})
    (registry,) = config.registries
    return registry


HUB = '[[registry]]\nname = "docker.io"\nmirrors = ["https://registry-1.docker.io"]\n'


def test_mirror_tables_and_digest_only_mirrors(tmp_path):
    registry = registry_of(
        tmp_path,
        """
        [[registry]]
        name = "docker.io"
        mirrors = ["https://a.example", { url = "https://b.example", resolve_tags = false }]
        """,
    )
    assert registry.mirrors == (
        MirrorConfig("https://a.example"),
        MirrorConfig("https://b.example", resolve_tags=False),
    )


@pytest.mark.parametrize(
    "mirrors, message",
    [
        (
            '[{ url = "https://b.example", resolve_tags = false }]',
            "at least one mirror that can resolve tags",
        ),
        ('[{ url = "https://b.example", trusted = 1 }]', "mirrors[0].trusted: unknown key"),
        (
            '["https://a.example", { url = "https://b.example", resolve_tags = "no" }]',
            "mirrors[1].resolve_tags: expected true or false",
        ),
        ("[{ resolve_tags = true }]", "mirrors[0].url: is required"),
        ("[5]", "mirrors[0]: expected a URL or a table"),
        ('"https://a.example"', "mirrors: expected a list of URLs or tables"),
    ],
)
def test_bad_mirror_entries(tmp_path, mirrors, message):
    error = config_error(tmp_path, f'[[registry]]\nname = "x.io"\nmirrors = {mirrors}\n')
    assert "registry[0].mirrors" in error and message in error


def test_upstream_timeouts_backoff_and_per_registry_overrides(tmp_path):
    config = load_config(
        write(
            tmp_path,
            """
            [upstream]
            connect_timeout = "2s"
            response_timeout = "1m"
            backoff_initial = "1s"
            backoff_max = "30s"
            [[registry]]
            name = "docker.io"
            mirrors = ["https://registry-1.docker.io"]
            response_timeout = "10s"
            [[registry]]
            name = "ghcr.io"
            mirrors = ["https://ghcr.io"]
            """,
        ),
        environ={},
    )
    hub, ghcr = config.registries
    assert (hub.upstream.connect_timeout, hub.upstream.response_timeout) == (2.0, 10.0)
    assert (ghcr.upstream.connect_timeout, ghcr.upstream.response_timeout) == (2.0, 60.0)
    assert (hub.upstream.backoff_initial, hub.upstream.backoff_max) == (1.0, 30.0)
    assert "connect_timeout: must be longer than zero" in config_error(
        tmp_path, "[upstream]\nconnect_timeout = 0\n"
    )


def test_address_family_and_tls_keys(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    registry = registry_of(
        tmp_path, HUB + f'address_family = "any"\nca_file = "{ca}"\ninsecure = true\n'
    )
    assert (registry.address_family, registry.ca_file, registry.insecure) == ("any", ca, True)
    assert registry_of(tmp_path, HUB).address_family == "ipv4"
    assert "must be one of ipv4, ipv6, any, not 'ipv5'" in config_error(
        tmp_path, HUB + 'address_family = "ipv5"\n'
    )
    assert "is not a readable file" in config_error(
        tmp_path, HUB + 'ca_file = "/nonexistent.pem"\n'
    )


def password_file(tmp_path, content="s3cret-password\n", mode=0o600):
    path = tmp_path / "password"
    path.write_text(content)
    path.chmod(mode)
    return path


def test_credentials_from_a_password_file(tmp_path):
    path = password_file(tmp_path)
    registry = registry_of(tmp_path, HUB + f'username = "alice"\npassword_file = "{path}"\n')
    assert registry.credentials == Credentials("alice", Secret("s3cret-password"), str(path))
    assert registry.credentials.password.reveal() == "s3cret-password"


def test_credentials_from_environment_variables(tmp_path):
    environ = {"HUB_USER": "bob", "HUB_TOKEN": "dckr_pat_xyz"}
    registry = registry_of(
        tmp_path, HUB + 'username_env = "HUB_USER"\npassword_env = "HUB_TOKEN"\n', environ
    )
    assert registry.credentials == Credentials("bob", Secret("dckr_pat_xyz"), "$HUB_TOKEN")


def test_password_file_readable_by_others_is_refused(tmp_path):
    path = password_file(tmp_path, mode=0o644)
    error = config_error(tmp_path, HUB + f'username = "alice"\npassword_file = "{path}"\n')
    assert "registry[0].password_file" in error
    assert "readable by its group or by other users (mode 0644): chmod 600 it" in error
    assert "s3cret" not in error


@pytest.mark.parametrize(
    "keys, message",
    [
        ('username = "alice"\n', "a username needs password_file or password_env"),
        ('password_env = "X"\n', "username: is required with a password"),
        (
            'username = "a"\nusername_env = "U"\npassword_env = "P"\n',
            "give username or username_env",
        ),
        ('username = "a"\npassword_env = "UNSET"\n', "$UNSET is not set"),
        ('username = "a"\npassword_file = "/nonexistent"\n', "cannot read '/nonexistent'"),
    ],
)
def test_incomplete_credentials(tmp_path, keys, message):
    assert message in config_error(tmp_path, HUB + keys)


def test_each_mirror_can_have_its_own_credentials(tmp_path):
    path = password_file(tmp_path)
    environ = {"TOKEN": "dckr_pat_xyz"}
    registry = registry_of(
        tmp_path,
        f"""
        [[registry]]
        name = "docker.io"
        mirrors = [
            {{ url = "https://artifactory.example", username = "ci", password_file = "{path}" }},
            {{ url = "https://registry-1.docker.io", username = "bob", password_env = "TOKEN" }},
            "https://plain.example",
        ]
        """,
        environ,
    )
    company, hub, plain = registry.mirrors
    assert company == MirrorConfig(
        "https://artifactory.example",
        credentials=Credentials("ci", Secret("s3cret-password"), str(path)),
    )
    assert hub.credentials == Credentials("bob", Secret("dckr_pat_xyz"), "$TOKEN")
    assert (registry.credentials, plain.credentials) == (None, None)
    assert [registry.credentials_for(m) for m in registry.mirrors] == [
        company.credentials,
        hub.credentials,
        None,
    ]


def test_a_mirrors_own_credentials_win_over_the_registrys_and_reach_it_even_digest_only():
    alice = Credentials("alice", Secret("a"), "test")
    ci = Credentials("ci", Secret("c"), "test")
    own = MirrorConfig("https://company.example", resolve_tags=False, credentials=ci)
    third_party = MirrorConfig("https://mirror.example", resolve_tags=False)
    hub = MirrorConfig("https://registry-1.docker.io")
    registry = RegistryConfig("docker.io", (hub, own, third_party), credentials=alice)
    assert registry.credentials_for(hub) == alice
    assert registry.credentials_for(own) == ci
    assert registry.credentials_for(third_party) is None


def test_mirror_hosts_of_docker_hub_are_known_by_host_not_by_registry_name():
    hub_hosts = ["https://registry-1.docker.io", "https://index.docker.io", "https://docker.io"]
    assert all(MirrorConfig(url).is_docker_hub for url in hub_hosts)
    assert not MirrorConfig("https://artifactory.example").is_docker_hub
    assert not MirrorConfig("https://docker.io.example").is_docker_hub


def test_a_mirrors_password_file_follows_the_registrys_rules(tmp_path):
    path = password_file(tmp_path, mode=0o640)
    error = config_error(
        tmp_path,
        f"""
        [[registry]]
        name = "docker.io"
        mirrors = [
            "https://registry-1.docker.io",
            {{ url = "https://company.example", username = "ci", password_file = "{path}" }},
        ]
        """,
    )
    assert "registry[0].mirrors[1].password_file" in error
    assert "readable by its group or by other users (mode 0640): chmod 600 it" in error
    assert "s3cret" not in error


@pytest.mark.parametrize(
    "keys, message",
    [
        ('username = "ci"', "mirrors[0].password_file: a username needs password_file"),
        ('password_env = "X"', "mirrors[0].username: is required with a password"),
        ('username = "ci", password_env = "UNSET"', "mirrors[0].password_env: $UNSET is not set"),
    ],
)
def test_incomplete_mirror_credentials(tmp_path, keys, message):
    mirrors = f'[{{ url = "https://company.example", {keys} }}]'
    assert message in config_error(tmp_path, f'[[registry]]\nname = "x.io"\nmirrors = {mirrors}\n')


def test_secrets_never_show_in_the_config_repr(tmp_path):
    path = password_file(tmp_path)
    config = load_config(
        write(
            tmp_path,
            HUB + f'username = "alice"\npassword_file = "{path}"\n'
            '[upstream]\nproxy = "http://proxyuser:proxypass@proxy.example:3128"\n',
        ),
        environ={},
    )
    text = repr(config) + str(config)
    assert "s3cret" not in text and "proxypass" not in text
    assert "Secret('***')" in text


def test_proxy_from_environment(tmp_path):
    environ = {
        "HTTPS_PROXY": "http://upper.example:1",
        "https_proxy": "http://lower.example:3128",
        "HTTP_PROXY": "plain.example:8080",
        "NO_PROXY": "localhost, .internal.example,10.0.0.0/8",
    }
    proxy = registry_of(tmp_path, HUB, environ).upstream.proxy
    assert proxy.https == ProxyServer("lower.example", 3128)
    assert proxy.http == ProxyServer("plain.example", 8080)
    assert proxy.no_proxy == ("localhost", ".internal.example", "10.0.0.0/8")


def test_configured_proxy_wins_over_environment_and_empty_disables(tmp_path):
    environ = {"HTTPS_PROXY": "http://env.example:1"}
    configured = registry_of(
        tmp_path, '[upstream]\nproxy = "http://cfg.example:3128"\n' + HUB, environ
    )
    assert (
        configured.upstream.proxy.https
        == configured.upstream.proxy.http
        == ProxyServer("cfg.example", 3128)
    )
    disabled = registry_of(tmp_path, HUB + 'proxy = ""\n', environ)
    assert disabled.upstream.proxy.https is None
    assert "$HTTPS_PROXY: proxy 'https://x.example' must be an http:// URL" in config_error(
        tmp_path, HUB, {"HTTPS_PROXY": "https://x.example"}
    )


def test_proxy_credentials_become_a_basic_authorization_secret(tmp_path):
    registry = registry_of(tmp_path, HUB + 'proxy = "http://me:p%40ss@proxy.example:3128"\n')
    server = registry.upstream.proxy.https
    assert (server.host, server.port, server.display) == (
        "proxy.example",
        3128,
        "http://proxy.example:3128",
    )
    assert server.authorization.reveal() == "Basic bWU6cEBzcw=="  # me:p@ss


@pytest.mark.parametrize(
    "host, bypassed",
    [
        ("registry-1.docker.io", False),
        ("localhost", True),
        ("mirror.internal.example", True),
        ("internal.example", True),
        ("notinternal.example", False),
        ("10.1.2.3", True),
        ("11.1.2.3", False),
    ],
)
def test_no_proxy_matching(host, bypassed):
    proxy = ProxyConfig(
        https=ProxyServer("p", 1), no_proxy=("localhost", ".internal.example", "10.0.0.0/8")
    )
    assert (proxy.for_url("https", host) is None) == bypassed
    assert ProxyConfig(https=ProxyServer("p", 1), no_proxy=("*",)).for_url("https", host) is None


@pytest.mark.parametrize(
    ("value", "rate"), [('"8MiB"', 8 << 20), ("0", 0), ('"512KiB"', 512 << 10)]
)
def test_scrub_rate(tmp_path, value, rate):
    config = load_config(write(tmp_path, f"[cache]\nscrub_rate = {value}\n"), environ={})
    assert config.cache.scrub_rate == rate


def test_the_scrub_runs_at_4_mib_a_second_by_default(tmp_path):
    assert load_config(write(tmp_path, ""), environ={}).cache.scrub_rate == 4 << 20
    message = config_error(tmp_path, '[cache]\nscrub_rate = "fast"\n')
    assert "cache.scrub_rate: 'fast' is not a size" in message


FLEET = """
[fleet]
self = "http://10.0.0.5:5050"
peers = ["http://10.0.0.5:5050", "HTTP://10.0.0.6:5050/", "http://10.0.0.7:5050"]
"""


def test_fleet_lists_the_other_peers_normalized(tmp_path):
    fleet = load_config(write(tmp_path, FLEET), environ={}).fleet
    assert fleet == FleetConfig(
        "http://10.0.0.5:5050", ("http://10.0.0.6:5050", "http://10.0.0.7:5050")
    )
    assert fleet.enabled
    assert not load_config(write(tmp_path, ""), environ={}).fleet.enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'self = "10.0.0.5:5050"\npeers = ["http://a:1"]',
            "fleet.self: '10.0.0.5:5050' must start with",
        ),
        (
            'self = "http://a:1/v2"\npeers = ["http://b:1"]',
            "fleet.self: 'http://a:1/v2' must be a bare",
        ),
        (
            'self = "http://a:1"\npeers = ["http://b:1", "http://B:1/"]',
            "fleet.peers[1]: 'http://B:1/' is listed twice",
        ),
        (
            'self = "http://a:1"\npeers = ["http://a:1", "http://a:1"]',
            "fleet.peers[1]: 'http://a:1' is listed twice",
        ),
        ('self = "http://a:1"\npeers = ["ftp://b"]', "fleet.peers[0]: 'ftp://b' must start with"),
        ('self = "http://a:1"\npeers = "http://b:1"', "fleet.peers: expected a list of strings"),
        ('peers = ["http://b:1"]', "fleet.self: is required with peers"),
        ('self = "http://a:1"', "fleet.peers: is required with self"),
        ('self = "http://a:1"\npeers = ["http://b:1"]\nowner = "x"', "fleet.owner: unknown key"),
    ],
)
def test_bad_fleet_keys_are_named(tmp_path, text, message):
    assert message in config_error(tmp_path, "[fleet]\n" + text)


class TestPushConfig:
    def test_hosted_and_push_through_registries(self, tmp_path):
        config = load_config(
            write(
                tmp_path,
                """
                [server]
                push_from = ["10.0.0.0/8", "::1/128"]
                [[registry]]
                name = "local"
                hosted = true
                [[registry]]
                name = "registry.example.com"
                mirrors = ["https://registry.example.com"]
                push = true
                push_chunk_size = "20MiB"
                """,
            ),
            environ={},
        )
        local, origin = config.registries
        assert (local.hosted, local.mirrors, local.takes_pushes) == (True, (), True)
        assert (origin.push, origin.push_chunk_size, origin.hosted) == (True, 20 << 20, False)
        assert config.server.push_from == ("10.0.0.0/8", "::1/128")
        assert config.server.push_users is None

    @pytest.mark.parametrize(
        "table, key, problem",
        [
            ('hosted = true\nmirrors = ["https://r.example"]', "hosted", "has no mirrors"),
            ("hosted = true\npush = true", "push", "takes pushes itself"),
            ('hosted = true\npush_chunk_size = "20MiB"', "push_chunk_size", "has none"),
            ('hosted = true\nusername = "ci"', "username", "has none"),
            ('hosted = true\nca_file = "/etc/ca.pem"', "ca_file", "has none"),
            ("hosted = true\noffline = true", "offline", "has none"),
            (
                'push = true\nmirrors = [{ url = "https://r.example", resolve_tags = false }]',
                "push",
                "resolve tags",
            ),
            (
                'mirrors = ["https://r.example"]\npush_chunk_size = "1KiB"',
                "push_chunk_size",
                "1MiB",
            ),
            ("", "mirrors", "hosted = true"),
        ],
    )
    def test_contradictions_name_the_key(self, tmp_path, table, key, problem):
        error = config_error(tmp_path, f'[[registry]]\nname = "x.example"\n{table}\n')
        assert f"registry[0].{key}" in error and problem in error

    def test_push_from_takes_networks_only(self, tmp_path):
        error = config_error(tmp_path, '[server]\npush_from = ["loopback"]\n')
        assert "server.push_from" in error and "10.0.0.0/8" in error

    def test_push_users_file(self, tmp_path):
        users = tmp_path / "push.htpasswd"
        users.write_text("ci:$2y$05$abcdefghijklmnopqrstuuDqXzM3wF1y8s2YkTqfW9Q0U7nG1hC2e\n")
        text = f'[server]\npush_users_file = "{users}"\n'
        users.chmod(0o644)
        assert "chmod 600" in config_error(tmp_path, text)
        users.chmod(0o600)
        config = load_config(write(tmp_path, text), environ={})
        assert config.server.push_users is not None
        assert config.server.push_users.hash_for("ci") is not None
        assert "$2y$" not in repr(config.server.push_users)
        users.write_text("ci:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
        error = config_error(tmp_path, text)
        assert "server.push_users_file" in error and "htpasswd -B" in error
        users.unlink()
        error = config_error(tmp_path, text)
        assert "server.push_users_file" in error and f"cannot read {str(users)!r}" in error
