"""Which registry and repository a request path names."""

import pytest

from txregistry.config import MirrorConfig, RegistryConfig
from txregistry.http.routing import Kind, Router
from txregistry.oci.errors import RegistryError
from txregistry.oci.reference import Digest, Tag

HEX = "b" * 64
HUB = RegistryConfig(
    "docker.io",
    (MirrorConfig("https://registry-1.docker.io"),),
    aliases=("index.docker.io", "registry-1.docker.io"),
    default=True,
)
GHCR = RegistryConfig("ghcr.io", (MirrorConfig("https://ghcr.io"),))
LOCAL = RegistryConfig("registry.local:5000", (MirrorConfig("http://10.0.0.5:5000"),))


@pytest.fixture
def router():
    return Router([HUB, GHCR, LOCAL])


def route(router, path, ns=None):
    return router.route(path.encode(), None if ns is None else ns.encode())


def error_of(router, path, ns=None):
    with pytest.raises(RegistryError) as caught:
        route(router, path, ns)
    return caught.value


def test_manifest_by_tag_on_default_registry_gets_library_prefix(router):
    r = route(router, "/v2/alpine/manifests/3.20")
    assert (r.registry, r.repository, r.kind, r.reference, r.prefix) == (
        HUB,
        "library/alpine",
        Kind.MANIFEST,
        Tag("3.20"),
        "",
    )


def test_two_component_names_keep_their_namespace(router):
    assert route(router, "/v2/bitnami/redis/manifests/7").repository == "bitnami/redis"


def test_blob_and_referrers_need_digests(router):
    blob = route(router, f"/v2/library/alpine/blobs/sha256:{HEX}")
    assert (blob.kind, blob.reference) == (Kind.BLOB, Digest("sha256", HEX))
    referrers = route(router, f"/v2/library/alpine/referrers/sha256:{HEX}")
    assert referrers.kind is Kind.REFERRERS
    assert error_of(router, "/v2/library/alpine/blobs/latest").code == "DIGEST_INVALID"


def test_tags_list(router):
    r = route(router, "/v2/library/alpine/tags/list")
    assert (r.kind, r.repository, r.reference) == (Kind.TAGS, "library/alpine", None)


def test_the_last_kind_segment_separates_name_and_reference(router):
    r = route(router, "/v2/org/manifests/manifests/latest")
    assert (r.repository, r.reference) == ("org/manifests", Tag("latest"))


def test_ns_selects_registry_by_name_or_alias(router):
    assert route(router, "/v2/org/img/manifests/1", ns="ghcr.io").registry is GHCR
    assert route(router, "/v2/alpine/manifests/1", ns="index.docker.io").registry is HUB
    assert route(router, "/v2/alpine/manifests/1", ns="https://index.docker.io/v1/").registry is HUB
    assert route(router, "/v2/img/manifests/1", ns="registry.local:5000").registry is LOCAL


def test_ns_for_unconfigured_registry_is_name_unknown(router):
    error = error_of(router, "/v2/org/img/manifests/1", ns="evil.example.com")
    assert (error.status, error.code) == (404, "NAME_UNKNOWN")
    assert "not configured" in error.message
    assert error_of(router, "/v2/org/img/manifests/1", ns="10.1.2.3").code == "NAME_UNKNOWN"


def test_path_prefix_selects_registry_and_is_stripped(router):
    r = route(router, "/v2/docker.io/library/alpine/manifests/3.20")
    assert (r.registry, r.repository, r.prefix) == (HUB, "library/alpine", "docker.io")
    r = route(router, "/v2/docker.io/alpine/manifests/3.20")
    assert r.repository == "library/alpine"
    r = route(router, "/v2/ghcr.io/org/tool/manifests/v1")
    assert (r.registry, r.repository) == (GHCR, "org/tool")


def test_path_prefix_wins_over_ns(router):
    r = route(router, "/v2/ghcr.io/org/tool/manifests/v1", ns="docker.io")
    assert (r.registry, r.repository) == (GHCR, "org/tool")


def test_unconfigured_host_prefix_is_refused_not_sent_to_default(router):
    error = error_of(router, "/v2/quay.io/org/img/manifests/v1")
    assert (error.status, error.code) == (404, "NAME_UNKNOWN")
    assert "'quay.io' is not configured" in error.message
    assert error_of(router, "/v2/localhost/img/manifests/v1").code == "NAME_UNKNOWN"
    assert error_of(router, "/v2/127.0.0.1:80/img/manifests/v1").code == "NAME_UNKNOWN"


def test_with_ns_a_dotted_first_component_is_part_of_the_name(router):
    r = route(router, "/v2/my.org/img/manifests/v1", ns="ghcr.io")
    assert (r.registry, r.repository) == (GHCR, "my.org/img")


def test_registry_name_alone_is_a_repository_name(router):
    # As in Docker's own parser, a registry host needs a "/" after it.
    r = route(router, "/v2/docker.io/manifests/latest")
    assert (r.registry, r.repository, r.prefix) == (HUB, "library/docker.io", "")


def test_no_default_registry():
    router = Router([GHCR])
    error = error_of(router, "/v2/alpine/manifests/latest")
    assert (error.status, error.code) == (404, "NAME_UNKNOWN")


@pytest.mark.parametrize(
    "path, code",
    [
        ("/v2/Alpine/manifests/latest", "NAME_INVALID"),
        ("/v2/library%2Falpine/manifests/latest", "NAME_INVALID"),
        ("/v2/library/../alpine/manifests/latest", "NAME_INVALID"),
        ("/v2/alpine/manifests/-bad", "MANIFEST_UNKNOWN"),
        ("/v2/alpine/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN"),
        ("/v2/alpine/manifests/sha256:123", "DIGEST_INVALID"),
        ("/v2/alpine/nothing/latest", "UNSUPPORTED"),
        ("/v3/alpine/manifests/latest", "NOT_FOUND"),
        ("/v2/alpine/blobs/uploads/a%2Fb", "BLOB_UPLOAD_UNKNOWN"),
    ],
)
def test_bad_paths(router, path, code):
    assert error_of(router, path).code == code


def test_non_ascii_path(router):
    with pytest.raises(RegistryError) as caught:
        router.route("/v2/älpine/manifests/1".encode(), None)
    assert caught.value.code == "NAME_INVALID"


def test_upload_paths_name_the_repository_and_the_upload():
    router = Router([HUB, RegistryConfig("local", (), hosted=True)])
    new = router.route(b"/v2/local/team/app/blobs/uploads/")
    assert (new.registry.name, new.repository, new.kind, new.upload) == (
        "local",
        "team/app",
        Kind.UPLOADS,
        "",
    )
    assert router.route(b"/v2/local/app/blobs/uploads").upload == ""
    assert router.route(b"/v2/local/app/blobs/uploads/1234-abcd").upload == "1234-abcd"
    # A repository may be called "blobs": the last separator wins.
    assert router.route(b"/v2/local/blobs/blobs/uploads/x").repository == "blobs"
