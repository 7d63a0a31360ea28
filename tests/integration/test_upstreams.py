"""
Upstreams that survive the real world, with real parts: several distribution
registries as mirrors (one stopped, one stale), htpasswd and token auth,
TLS with a test CA, and tinyproxy, with skopeo pulling through txregistry
in every case.
"""

import json
import re

import pytest
import pytest_twisted
import treq
from conftest import PASSWORD, USER, htpasswd_registry, password_file, push_images
from harness.network import RecordingReactor, TableResolver
from harness.registry import DistributionRegistry, hub
from harness.skopeo import check_pulled
from twisted.internet import reactor

from txregistry.config import (
    Credentials,
    MirrorConfig,
    ProxyConfig,
    ProxyServer,
    RegistryConfig,
    Secret,
    UpstreamConfig,
    parse_config,
)

pytestmark = pytest.mark.integration


async def health(tx):
    response = await treq.get(f"{tx.url}/health")
    return await response.json()


@pytest_twisted.ensureDeferred
async def test_pull_fails_over_from_a_stopped_mirror(
    upstream, start_txregistry, skopeo, tmp_path, logs
):
    stopped = DistributionRegistry(tmp_path / "stopped").start()
    stopped.stop()
    mirrors = (MirrorConfig(stopped.url), MirrorConfig(upstream.url))
    tx = start_txregistry(RegistryConfig("docker.io", mirrors, default=True))
    image = upstream.images["small"]

    pulled = await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / "pulled")
    check_pulled(pulled, image.digest)
    assert logs.matching(
        f"Mirror request failed: {stopped.url} manifest library/small:v1:"
        f" cannot connect to 127.0.0.1:{stopped.port}: 127.0.0.1: connection refused"
    )
    first, second = (await health(tx))["registries"]["docker.io"]["mirrors"]
    assert first["state"] == "backoff" and "connection refused" in first["last_error"]
    assert second["state"] == "ok"


@pytest_twisted.ensureDeferred
async def test_digest_only_mirror_cannot_swap_a_tag_but_serves_digests(
    start_txregistry, skopeo, tmp_path
):
    trusted = DistributionRegistry(tmp_path / "trusted").start()
    stale = DistributionRegistry(tmp_path / "stale").start()
    try:
        image = push_images(skopeo, tmp_path / "layouts", trusted, names=("small",))["small"]
        # The stale mirror has the same content under another tag, and
        # something else entirely under the tag.
        push_images(skopeo, tmp_path / "layouts", stale, names=("small",), tag="copy")
        push_images(skopeo, tmp_path / "other", stale, names=("docker",))
        skopeo.run(
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{stale.host}/library/docker:v1",
            f"docker://{stale.host}/library/small:v1",
        )
        mirrors = (MirrorConfig(trusted.url), MirrorConfig(stale.url, resolve_tags=False))
        tx = start_txregistry(RegistryConfig("docker.io", mirrors, default=True))
        mark = stale.mark()

        check_pulled(await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / "a"), image.digest)
        trusted.stop()
        fresh = start_txregistry(RegistryConfig("docker.io", mirrors, default=True))
        by_digest = f"{fresh.host}/library/small@{image.digest}"
        check_pulled(await skopeo.pull(by_digest, tmp_path / "b"), image.digest)
        # skopeo prints the status line, where txregistry names the mirror.
        with pytest.raises(
            AssertionError,
            match=f"502 upstream registry docker.io is unavailable: {re.escape(trusted.url)}: ",
        ):
            await skopeo.pull(f"{fresh.host}/library/small:v1", tmp_path / "c")

        asked = [a.path for a in stale.accesses(mark) if "marker" not in a.path]
        assert asked, "the digest-only mirror served the pull by digest"
        assert not [p for p in asked if re.search(r"/manifests/(?!sha256:)", p)], asked
    finally:
        trusted.stop()
        stale.stop()


@pytest_twisted.ensureDeferred
async def test_ipv4_only_never_dials_the_ipv6_address(upstream, start_txregistry, skopeo, tmp_path):
    # The resolver answers ::1 first, then 127.0.0.1; only the IPv4 side
    # has a listener, as on a VM with IPv6 DNS but no IPv6 route.
    resolver = TableResolver({"mirror.test": ["::1", "127.0.0.1"]}, reactor.nameResolver)
    recording = RecordingReactor(reactor)
    registry = RegistryConfig(
        "docker.io", (MirrorConfig(f"http://mirror.test:{upstream.registry.port}"),), default=True
    )
    tx = start_txregistry(registry, reactor=recording, resolver=resolver)
    image = upstream.images["small"]
    check_pulled(
        await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / "pulled"), image.digest
    )
    assert recording.dialled and set(recording.dialled) == {"127.0.0.1"}


@pytest_twisted.ensureDeferred
async def test_host_names_resolve_through_txregistrys_own_resolver(
    upstream, start_txregistry, skopeo, tmp_path
):
    # No resolver injected: "localhost" goes through getaddrinfo in the
    # reactor's thread pool, as in the service.
    tx = start_txregistry(hub(f"http://localhost:{upstream.registry.port}"))
    pulled = await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / "pulled")
    check_pulled(pulled, upstream.images["small"].digest)


@pytest_twisted.ensureDeferred
async def test_htpasswd_registry_gets_basic_auth(
    htpasswd_upstream, start_txregistry, skopeo, tmp_path
):
    credentials = Credentials(USER, Secret(PASSWORD), str(password_file(tmp_path)))
    private = RegistryConfig(
        "private.example", (MirrorConfig(htpasswd_upstream.url),), credentials=credentials
    )
    tx = start_txregistry(private)
    image = htpasswd_upstream.images["small"]
    pulled = await skopeo.pull(f"{tx.host}/private.example/library/small:v1", tmp_path / "pulled")
    check_pulled(pulled, image.digest)

    anonymous = start_txregistry(
        RegistryConfig("private.example", (MirrorConfig(htpasswd_upstream.url),))
    )
    response = await treq.get(f"{anonymous.url}/v2/private.example/library/small/manifests/v1")
    assert response.code == 401
    assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"


@pytest_twisted.ensureDeferred
async def test_a_docker_io_registry_pulls_from_basic_auth_mirrors_with_their_own_credentials(
    htpasswd_upstream, start_txregistry, skopeo, tmp_path, logs
):
    # A company registry (Basic auth, user ci) first, holding one image; a
    # second Basic-auth registry with another user holding another.  The
    # registry is named docker.io, as when a company mirrors Docker Hub.
    company_password = "c0mpany-Passw0rd"
    company = htpasswd_registry(tmp_path / "company", skopeo, "ci", company_password, ("docker",))
    try:
        company_file = password_file(tmp_path / "company", company_password)
        config = parse_config(
            {
                "cache": {"directory": str(tmp_path / "unused")},
                "registry": [
                    {
                        "name": "docker.io",
                        "mirrors": [
                            {
                                "url": company.url,
                                "username": "ci",
                                "password_file": str(company_file),
                            },
                            {
                                "url": htpasswd_upstream.url,
                                "username": USER,
                                "password_env": "SECOND_PASSWORD",
                            },
                        ],
                    }
                ],
            },
            environ={"SECOND_PASSWORD": PASSWORD},
        )
        company_mark, second_mark = company.registry.mark(), htpasswd_upstream.registry.mark()
        tx = start_txregistry(*config.registries)

        docker = company.images["docker"]
        check_pulled(await skopeo.pull(f"{tx.host}/docker:v1", tmp_path / "a"), docker.digest)
        small = htpasswd_upstream.images["small"]
        check_pulled(await skopeo.pull(f"{tx.host}/small:v1", tmp_path / "b"), small.digest)

        def answered(registry, mark, image):
            return [
                (a.method, a.status)
                for a in registry.accesses(mark)
                if a.path == f"/v2/library/{image}/manifests/v1"
            ]

        # Each answered with 200 only after its own login: a 401, then 200.
        assert answered(company.registry, company_mark, "docker") == [("GET", 401), ("GET", 200)]
        assert ("GET", 200) in answered(htpasswd_upstream.registry, second_mark, "small")
        # The company mirror was asked for small too, logged in, and said 404.
        assert ("GET", 404) in answered(company.registry, company_mark, "small")
        assert logs.matching(
            f"using credentials for registry docker.io mirror {company.url} (user: ci,"
        )
        mirrors = (await health(tx))["registries"]["docker.io"]["mirrors"]
        assert [m.get("user") for m in mirrors] == ["ci", USER]
        assert company_password not in logs.text() and PASSWORD not in logs.text()
    finally:
        company.registry.stop()


@pytest_twisted.ensureDeferred
async def test_credentials_apply_to_names_without_a_registry(
    login_token_upstream, start_txregistry, skopeo, tmp_path, logs
):
    credentials = Credentials(USER, Secret(PASSWORD), "test")
    tx = start_txregistry(hub(login_token_upstream.url, credentials=credentials))
    image = login_token_upstream.images["small"]
    server = login_token_upstream.token_server
    start = len(server.lines)

    # "small", as a user would write it: no registry, no library/.
    check_pulled(await skopeo.pull(f"{tx.host}/small:v1", tmp_path / "pulled"), image.digest)
    requests = [line for line in server.lines[start:] if line.startswith("TOKEN")]
    assert requests == [
        f"TOKEN scope=repository:library/small:pull service=test-registry user={USER}"
    ]

    tokens = [line.split(" ", 1)[1] for line in server.lines if line.startswith("ISSUED")]
    health_text = json.dumps(await health(tx))
    assert tokens
    for secret in [PASSWORD, *tokens]:
        assert secret not in logs.text() and secret not in health_text
    assert json.loads(health_text)["registries"]["docker.io"]["user"] == USER


@pytest_twisted.ensureDeferred
async def test_tls_upstream_with_a_private_ca(tls_upstream, ca, start_txregistry, skopeo, tmp_path):
    image = tls_upstream.images["small"]
    trusting = start_txregistry(hub(tls_upstream.url, ca_file=ca.cert_path))
    check_pulled(
        await skopeo.pull(f"{trusting.host}/library/small:v1", tmp_path / "pulled"), image.digest
    )

    distrusting = start_txregistry(hub(tls_upstream.url))
    response = await treq.get(f"{distrusting.url}/v2/library/small/manifests/v1")
    assert response.code == 502
    message = (await response.json())["errors"][0]["message"]
    assert f"{tls_upstream.url}: TLS: certificate verify failed" in message


@pytest_twisted.ensureDeferred
async def test_upstreams_through_a_real_http_proxy(
    upstream, tls_upstream, ca, tinyproxy, start_txregistry, skopeo, tmp_path, logs
):
    proxy = ProxyServer("127.0.0.1", tinyproxy.port)
    through_proxy = UpstreamConfig(proxy=ProxyConfig(http=proxy, https=proxy))
    tx = start_txregistry(
        hub(tls_upstream.url, ca_file=ca.cert_path, upstream=through_proxy),
        RegistryConfig("plain.example", (MirrorConfig(upstream.url),), upstream=through_proxy),
    )
    # HTTPS: a CONNECT tunnel, with the certificate still verified end to end.
    tls_image = tls_upstream.images["small"]
    check_pulled(
        await skopeo.pull(f"{tx.host}/library/small:v1", tmp_path / "tls"), tls_image.digest
    )
    # Plain HTTP: absolute-form requests.
    image = upstream.images["small"]
    pulled = await skopeo.pull(f"{tx.host}/plain.example/library/small:v1", tmp_path / "plain")
    check_pulled(pulled, image.digest)

    seen = tinyproxy.requests()
    assert f"CONNECT 127.0.0.1:{tls_upstream.registry.port} HTTP/1.1" in seen
    assert f"GET {upstream.url}/v2/library/small/manifests/v1 HTTP/1.1" in seen
    assert not [line for line in seen if f":{upstream.registry.port}" in line and "CONNECT" in line]
    # Neither the tunnels nor the pool's connections are announced one by one.
    assert not logs.matching("Starting factory") and not logs.matching("Stopping factory")
