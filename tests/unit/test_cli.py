"""The command line's pure parts: references, servers, doctor's conclusions, cache stats."""

import io
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, IPv6Address

from txregistry.cli.doctor import Check, MirrorReport, conclude, render
from txregistry.cli.doctor_fleet import PeerReport, disagreements, render_peers
from txregistry.cli.main import cache_command, check_config
from txregistry.cli.prefetch import ImageRef, PrefetchError, parse_image_ref, server_from_listen
from txregistry.config import CacheConfig, Config, FleetConfig, MirrorConfig, RegistryConfig
from txregistry.oci.reference import Digest
from txregistry.storage.disk import DiskStorage
from txregistry.storage.interface import StoredManifest
from txregistry.storage.runner import run_inline
from txregistry.upstream.dns import Lookup

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "text, image",
    [
        ("alpine", ImageRef("docker.io", "library/alpine", "latest")),
        ("alpine:3.20", ImageRef("docker.io", "library/alpine", "3.20")),
        ("postgres:17.2", ImageRef("docker.io", "library/postgres", "17.2")),
        ("bitnami/redis:7", ImageRef("docker.io", "bitnami/redis", "7")),
        ("docker.io/library/alpine:3.20", ImageRef("docker.io", "library/alpine", "3.20")),
        ("index.docker.io/alpine", ImageRef("index.docker.io", "library/alpine", "latest")),
        (f"ghcr.io/org/img@{DIGEST}", ImageRef("ghcr.io", "org/img", DIGEST)),
        ("localhost:5000/team/app:v2", ImageRef("localhost:5000", "team/app", "v2")),
    ],
)
def test_references_are_read_as_docker_reads_them(text, image):
    assert parse_image_ref(text) == image


@pytest.mark.parametrize("text", ["Alpine", "alpine:-bad", "ghcr.io/org/img@sha256:1234", ""])
def test_bad_references(text):
    with pytest.raises(ValueError):
        parse_image_ref(text)


def test_image_paths_name_the_registry():
    image = parse_image_ref("alpine:3.20")
    assert str(image) == "docker.io/library/alpine:3.20"
    assert image.path("manifests", "3.20") == "/v2/docker.io/library/alpine/manifests/3.20"


@pytest.mark.parametrize(
    "listen, url",
    [
        (("tcp:5050:interface=127.0.0.1",), "http://127.0.0.1:5050"),
        (("tcp:5050",), "http://127.0.0.1:5050"),
        (("unix:/run/x.sock", "tcp6:5050:interface=\\:\\:1"), "http://[::1]:5050"),
        (("ssl:5443:privateKey=k.pem",), "https://127.0.0.1:5443"),
    ],
)
def test_server_is_the_first_tcp_listener(listen, url):
    assert server_from_listen(listen) == url


def test_no_tcp_listener():
    with pytest.raises(PrefetchError):
        server_from_listen(("unix:/run/x.sock",))


HUB = RegistryConfig("docker.io", (MirrorConfig("https://registry-1.docker.io"),), default=True)


def report(url="https://registry-1.docker.io", resolve_tags=True, **checks):
    result = MirrorReport(MirrorConfig(url, resolve_tags))
    names = {
        "A": "A",
        "AAAA": "AAAA",
        "v4": "IPv4 connect",
        "v6": "IPv6 connect",
        "tls": "TLS",
        "v2": "/v2/",
        "token": "token",
    }
    for short, ok in checks.items():
        result.checks[names[short]] = Check(ok, "ok" if ok else ("-" if ok is None else "failed"))
    for name in names.values():
        result.checks.setdefault(name, Check(None, "-"))
    for short, family, address in (("A", "ipv4", IPv4Address), ("AAAA", "ipv6", IPv6Address)):
        found = (address("TCP", "192.0.2.1" if short == "A" else "::1", 443),)
        result.lookups[family] = Lookup(found if checks.get(short) else ())
    return result


def test_ipv6_that_resolves_but_does_not_connect_is_fine_with_ipv4():
    reports = [report(A=True, AAAA=True, v4=True, v6=False, tls=True, v2=True, token=True)]
    assert conclude(HUB, reports) == (
        True,
        "IPv6 resolves but does not connect; txregistry uses IPv4: fine",
    )


def test_nothing_reachable():
    reports = [
        report(A=True, AAAA=False, v4=False, v2=False),
        report("https://m.test", False, A=True, v4=False, v2=False),
    ]
    assert conclude(HUB, reports) == (False, "no mirror reachable: check DNS, firewall or proxy")


def test_only_ipv6_addresses():
    reports = [report(A=False, AAAA=True)]
    usable, text = conclude(HUB, reports)
    assert not usable
    assert text.startswith("no IPv4 address for registry-1.docker.io: it has only IPv6 (AAAA)")


def test_every_mirrors_dns_problem_is_named_once():
    reports = [report(A=False, AAAA=True), report("https://m.test", False, A=False, AAAA=False)]
    usable, text = conclude(HUB, reports)
    assert not usable
    first, second = text.split(" | ")
    assert first.startswith("no IPv4 address for registry-1.docker.io")
    assert second.startswith("cannot resolve m.test: no address found")


def test_behind_a_proxy_dns_is_the_proxys_business():
    unresolved = report(A=False, AAAA=False, v2=False)
    unresolved.proxy = "http://proxy.example:3128"
    assert conclude(HUB, [unresolved]) == (
        False,
        "no mirror reachable: check DNS, firewall or proxy",
    )


def test_tls_failing_everywhere():
    reports = [report(A=True, v4=True, tls=False, v2=False)]
    assert conclude(HUB, reports)[1].startswith("TLS fails with every mirror")


def test_only_digest_only_mirrors_answer():
    reports = [
        report(A=True, v4=False, v2=False),
        report("https://m.test", False, A=True, v4=True, tls=True, v2=True, token=True),
    ]
    usable, text = conclude(HUB, reports)
    assert usable and "pulls by tag do not" in text


def test_table_has_a_row_per_mirror_and_the_conclusion():
    reports = [report(A=True, AAAA=True, v4=True, v6=False, tls=True, v2=True, token=True)]
    text = render(HUB, reports, "the conclusion")
    lines = text.splitlines()
    assert lines[0] == "registry docker.io"
    assert "IPv6 connect" in lines[1] and "FAIL failed" in lines[2]
    assert lines[-1] == "  conclusion: the conclusion"


def test_config_check_names_each_mirrors_user_and_no_password(tmp_path, capsys):
    password = tmp_path / "company.password"
    password.write_text("c0mpany-secret\n")
    password.chmod(0o600)
    config = tmp_path / "txregistry.toml"
    config.write_text(
        "[server]\nadmin_listen = []\n"
        f'[cache]\ndirectory = "{tmp_path / "cache"}"\n'
        '[[registry]]\nname = "docker.io"\nmirrors = [\n'
        '  { url = "https://artifactory.example", username = "ci",'
        f' password_file = "{password}" }},\n'
        '  { url = "https://mirror.example", resolve_tags = false },\n'
        "]\n"
    )
    out = io.StringIO()
    assert check_config(str(config), out) == 0, capsys.readouterr().err
    text = out.getvalue()
    assert (
        "registry docker.io (default): https://artifactory.example (user ci),"
        " https://mirror.example (digest-only)"
    ) in text
    assert "c0mpany-secret" not in text


def test_cache_stats_shows_the_hit_ratio_of_answers(tmp_path):
    storage = DiskStorage(tmp_path / "cache", 1 << 30, run_inline)
    storage.start()
    for from_cache in (True, True, False):
        storage.count_answer(from_cache)
    storage.stop()
    out = io.StringIO()
    config = Config(cache=CacheConfig(tmp_path / "cache"), registries=())
    assert cache_command("stats", config, out) == 0
    assert "hit ratio   66.7% (2 hits, 1 misses)" in out.getvalue().splitlines()


def test_cache_stats_counts_the_corrupt_entries_removed(tmp_path):
    storage = DiskStorage(tmp_path / "cache", 1 << 30, run_inline)
    storage.start()
    bad = Digest.of(b"was")
    storage.put_manifest(bad, StoredManifest("t", b"now"))
    assert storage.get_manifest(bad).result is None
    storage.stop()
    out = io.StringIO()
    config = Config(cache=CacheConfig(tmp_path / "cache"), registries=())
    assert cache_command("stats", config, out) == 0
    lines = out.getvalue().splitlines()
    assert any(line.startswith("corrupt     1 entries removed") for line in lines)


def test_doctor_says_where_a_peer_disagrees_with_this_node():
    config = Config(
        cache=CacheConfig(Path("/tmp/c")),
        registries=(
            RegistryConfig("docker.io", (MirrorConfig("https://r.example"),), default=True),
            RegistryConfig("ghcr.io", (MirrorConfig("https://ghcr.io"),)),
        ),
        fleet=FleetConfig("http://a:5050", ("http://b:5050",)),
    )
    agreeing = {
        "fleet": {"self": "http://b:5050", "peers": [{"url": "http://a:5050"}]},
        "registries": {"docker.io": {}, "ghcr.io": {}},
    }
    assert disagreements(config, "http://b:5050", agreeing) == []
    assert disagreements(
        config,
        "http://b:5050",
        {"fleet": {"self": "http://10.0.0.2:5050", "peers": []}, "registries": {"docker.io": {}}},
    ) == [
        "it calls itself 'http://10.0.0.2:5050': use one URL for it on every node",
        "it does not list this node (http://a:5050) among its peers",
        "it does not configure registry ghcr.io",
    ]
    assert disagreements(config, "http://b:5050", {"registries": agreeing["registries"]}) == [
        "it is not in fleet mode: give it the same [fleet] peers"
    ]
    report = PeerReport("http://b:5050", "FAIL", problems=("no answer: connection refused",))
    text = render_peers("http://a:5050", [report])
    assert "http://b:5050  FAIL     -        no answer: connection refused" in text
    assert "conclusion: 1 of 1 peers have problems" in text


def test_config_check_describes_hosted_registries_and_who_may_push(tmp_path, capsys):
    config = tmp_path / "txregistry.toml"
    config.write_text(
        '[server]\nadmin_listen = []\npush_from = ["10.0.0.0/8"]\n'
        f'[cache]\ndirectory = "{tmp_path / "cache"}"\n'
        '[[registry]]\nname = "local"\nhosted = true\n'
    )
    out = io.StringIO()
    assert check_config(str(config), out) == 0, capsys.readouterr().err
    text = out.getvalue()
    assert "registry local: hosted here, pushed content kept pinned" in text
    assert "pushes from: 10.0.0.0/8, no credentials" in text
