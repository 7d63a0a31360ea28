"""
Credentials, in memory: who gets them and how.

The field failures behind these: pulls of names without a registry
("alpine") went out anonymously because they never matched the Docker Hub
credentials, and credentials were sent to Docker Hub's registry API as Basic
auth, which it does not accept.
"""

import base64
import json

from harness.memory import OCI_MANIFEST, FakeRegistry, MemoryRegistry
from twisted.web.server import NOT_DONE_YET

from txregistry.config import Credentials, MirrorConfig, RegistryConfig, Secret

PASSWORD = "s3cret-Passw0rd"
BASIC = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
ALICE = Credentials("alice", Secret(PASSWORD), "/etc/txregistry/password")


def hub_with_credentials(tmp_path, mirrors=None, **hosts):
    registry = RegistryConfig(
        "docker.io",
        mirrors or (MirrorConfig("https://registry-1.docker.io"),),
        aliases=("index.docker.io",),
        default=True,
        credentials=ALICE,
    )
    return MemoryRegistry(tmp_path, registries=[registry], hosts=hosts)


def authorizations(tx, host):
    return [s.headers.get("authorization") for s in tx.agent.to(host)]


def test_docker_hub_gets_credentials_only_through_its_token_service(tmp_path):
    hub = FakeRegistry(
        require_token=True,
        realm="https://auth.docker.test/token",
        token_credentials=f"alice:{PASSWORD}",
    )
    tx = hub_with_credentials(tmp_path, **{"registry-1.docker.io": hub, "auth.docker.test": hub})
    hub.add_manifest("library/alpine", "3.20", MANIFEST)
    blob = hub.add_blob(b"layer")

    # A name without a registry is a docker.io name, with docker.io's credentials.
    assert tx.get("/v2/alpine/manifests/3.20").status == 200
    assert tx.get(f"/v2/alpine/blobs/{blob}").body == b"layer"

    assert authorizations(tx, "auth.docker.test") == [BASIC]
    registry_auth = authorizations(tx, "registry-1.docker.io")
    assert registry_auth == [None, "Bearer token-0", "Bearer token-0"]
    assert not any(a and a.startswith("Basic") for a in registry_auth)


def test_docker_hub_asking_for_basic_auth_does_not_get_it(tmp_path):
    hub = FakeRegistry(require_basic=f"alice:{PASSWORD}")
    tx = hub_with_credentials(tmp_path, **{"registry-1.docker.io": hub})
    response = tx.get("/v2/alpine/manifests/3.20")
    assert response.status == 401
    assert authorizations(tx, "registry-1.docker.io") == [None]


def test_other_registries_get_basic_auth_when_they_ask_for_it(tmp_path):
    private = FakeRegistry(require_basic=f"alice:{PASSWORD}")
    private.add_manifest("team/app", "1", MANIFEST)
    private.add_manifest("team/app", "2", MANIFEST)
    registry = RegistryConfig(
        "registry.example", (MirrorConfig("https://registry.example"),), credentials=ALICE
    )
    tx = MemoryRegistry(tmp_path, registries=[registry], hosts={"registry.example": private})
    assert tx.get("/v2/registry.example/team/app/manifests/1").status == 200
    assert tx.get("/v2/registry.example/team/app/manifests/2").status == 200
    # Asked once; from then on sent from the start.
    assert authorizations(tx, "registry.example") == [None, BASIC, BASIC]


def test_wrong_credentials_are_a_401_without_retrying_for_ever(tmp_path):
    private = FakeRegistry(require_basic="alice:other-password")
    registry = RegistryConfig(
        "registry.example", (MirrorConfig("https://registry.example"),), credentials=ALICE
    )
    tx = MemoryRegistry(tmp_path, registries=[registry], hosts={"registry.example": private})
    response = tx.get("/v2/registry.example/team/app/manifests/1")
    assert response.status == 401
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert len(tx.agent.to("registry.example")) == 2
    assert PASSWORD not in response.body.decode()


def test_token_service_refusing_the_login_says_so_without_the_password(tmp_path, logs):
    hub = FakeRegistry(
        require_token=True, realm="https://auth.docker.test/token", token_credentials="alice:x"
    )
    tx = hub_with_credentials(tmp_path, **{"registry-1.docker.io": hub, "auth.docker.test": hub})
    response = tx.get("/v2/alpine/manifests/3.20")
    assert response.status == 401
    message = response.json()["errors"][0]["message"]
    assert (
        "token service https://auth.docker.test/token answered HTTP 401 for user alice" in message
    )
    assert PASSWORD not in response.body.decode() and PASSWORD not in logs.text()


def test_digest_only_mirrors_never_get_credentials(tmp_path):
    third_party = FakeRegistry(require_token=True, realm="https://auth.mirror.test/token")
    blob = third_party.add_blob(b"layer")
    tx = hub_with_credentials(
        tmp_path,
        mirrors=(
            MirrorConfig("https://registry-1.docker.io"),
            MirrorConfig("https://mirror.test", resolve_tags=False),
        ),
        **{"mirror.test": third_party, "auth.mirror.test": third_party},
    )
    tx.agent.refused.add("registry-1.docker.io")
    assert tx.get(f"/v2/alpine/blobs/{blob}").body == b"layer"
    assert authorizations(tx, "auth.mirror.test") == [None]
    assert authorizations(tx, "mirror.test") == [None, "Bearer token-0"]


def test_redirect_to_blob_storage_does_not_carry_the_authorization(tmp_path):
    hub = FakeRegistry(require_token=True, realm="https://auth.docker.test/token")
    storage = FakeRegistry()
    data = b"blob from storage"
    digest = storage.add_blob(data)

    def redirect(request):
        if b"/blobs/" in request.path and request.getHeader(b"authorization"):
            request.setResponseCode(307)
            request.setHeader(
                b"Location", f"https://storage.test/v2/x/blobs/{digest}?sig=abc".encode()
            )
            return b""
        return None

    hub.hooks.append(redirect)
    tx = hub_with_credentials(
        tmp_path, **{"registry-1.docker.io": hub, "auth.docker.test": hub, "storage.test": storage}
    )
    response = tx.get(f"/v2/alpine/blobs/{digest}")
    assert (response.status, response.body) == (200, data)
    assert authorizations(tx, "storage.test") == [None]
    assert authorizations(tx, "registry-1.docker.io")[-1] == "Bearer token-0"


def test_secrets_appear_in_no_log_error_or_health(tmp_path, logs):
    hub = FakeRegistry(require_token=True, realm="https://auth.docker.test/token")
    hub.add_manifest("library/alpine", "1", MANIFEST)
    tx = hub_with_credentials(
        tmp_path,
        mirrors=(MirrorConfig("https://down.test"), MirrorConfig("https://registry-1.docker.io")),
        **{"registry-1.docker.io": hub, "auth.docker.test": hub},
    )
    tx.agent.refused.add("down.test")
    assert tx.get("/v2/alpine/manifests/1").status == 200
    failure = tx.get("/v2/alpine/manifests/missing")
    health = json.dumps(tx.upstreams["docker.io"].describe())
    everything = logs.text() + failure.body.decode() + health
    assert hub.tokens_issued
    for secret in [PASSWORD, *hub.tokens_issued]:
        assert secret not in everything
    assert "alice" in health


def test_stalled_token_service_times_out(tmp_path):
    hub = FakeRegistry(require_token=True, realm="https://auth.docker.test/token")
    stalled = FakeRegistry(hooks=[lambda request: NOT_DONE_YET])
    tx = hub_with_credentials(
        tmp_path, **{"registry-1.docker.io": hub, "auth.docker.test": stalled}
    )
    client = tx.client()
    client.send("GET", "/v2/alpine/manifests/1")
    tx.clock.advance(30)
    tx.pump()
    response = client.response()
    assert response.status == 502
    assert (
        "token service https://auth.docker.test/token sent no answer within 30s"
        in response.body.decode()
    )


# Credentials per mirror.  The field failure: a registry named docker.io
# whose first mirror was a company's Artifactory, challenging with Basic,
# got 401, because every mirror of docker.io was treated as Docker Hub.

CI_PASSWORD = "c0mpany-Passw0rd"
CI = Credentials("ci", Secret(CI_PASSWORD), "/etc/txregistry/company.password")
BASIC_CI = "Basic " + base64.b64encode(f"ci:{CI_PASSWORD}".encode()).decode()


def test_a_company_mirror_of_docker_io_gets_basic_auth_with_its_own_credentials(tmp_path):
    company = FakeRegistry(require_basic=f"ci:{CI_PASSWORD}")
    company.add_manifest("library/alpine", "3.20", MANIFEST)
    company.add_manifest("library/alpine", "3.21", MANIFEST)
    tx = hub_with_credentials(
        tmp_path,
        mirrors=(
            MirrorConfig("https://artifactory.example", credentials=CI),
            MirrorConfig("https://registry-1.docker.io"),
        ),
        **{"artifactory.example": company},
    )
    assert tx.get("/v2/alpine/manifests/3.20").status == 200
    assert tx.get("/v2/alpine/manifests/3.21").status == 200
    # Asked once; from then on sent from the start; never the registry's.
    assert authorizations(tx, "artifactory.example") == [None, BASIC_CI, BASIC_CI]
    assert tx.agent.to("registry-1.docker.io") == []


def test_a_registrys_own_credentials_go_as_basic_to_a_mirror_that_is_not_docker_hub(tmp_path):
    company = FakeRegistry(require_basic=f"alice:{PASSWORD}")
    company.add_manifest("library/alpine", "3.20", MANIFEST)
    tx = hub_with_credentials(
        tmp_path,
        mirrors=(MirrorConfig("https://nexus.example"),),
        **{"nexus.example": company},
    )
    assert tx.get("/v2/alpine/manifests/3.20").status == 200
    assert authorizations(tx, "nexus.example") == [None, BASIC]


def test_two_mirrors_pull_with_two_sets_of_credentials(tmp_path):
    company = FakeRegistry(require_basic=f"ci:{CI_PASSWORD}")
    hub = FakeRegistry(
        require_token=True,
        realm="https://auth.docker.test/token",
        token_credentials=f"alice:{PASSWORD}",
    )
    hub.add_manifest("library/alpine", "3.20", MANIFEST)
    tx = hub_with_credentials(
        tmp_path,
        mirrors=(
            MirrorConfig("https://artifactory.example", credentials=CI),
            MirrorConfig("https://registry-1.docker.io"),
        ),
        **{"artifactory.example": company, "registry-1.docker.io": hub, "auth.docker.test": hub},
    )
    # The company mirror lacks it (404 after the login), so Docker Hub is
    # asked, with the registry's credentials at its token service.
    assert tx.get("/v2/alpine/manifests/3.20").status == 200
    assert authorizations(tx, "artifactory.example") == [None, BASIC_CI]
    assert authorizations(tx, "auth.docker.test") == [BASIC]
    assert authorizations(tx, "registry-1.docker.io") == [None, "Bearer token-0"]


def test_docker_hubs_hosts_never_get_basic_whatever_the_registry_is_called(tmp_path):
    hub = FakeRegistry(require_basic=f"ci:{CI_PASSWORD}")
    registry = RegistryConfig(
        "hub.internal.example",
        (MirrorConfig("https://registry-1.docker.io", credentials=CI),),
        credentials=ALICE,
    )
    tx = MemoryRegistry(tmp_path, registries=[registry], hosts={"registry-1.docker.io": hub})
    response = tx.get("/v2/hub.internal.example/library/alpine/manifests/3.20")
    assert response.status == 401
    assert authorizations(tx, "registry-1.docker.io") == [None]


def test_mirrors_sharing_a_token_service_never_share_a_token(tmp_path):
    issued: list[str] = []
    realm = "https://auth.shared.test/token"
    first = FakeRegistry(require_token=True, realm=realm, tokens_issued=issued)
    second = FakeRegistry(require_token=True, realm=realm, tokens_issued=issued)
    second.add_manifest("library/alpine", "3.20", MANIFEST)
    service = FakeRegistry(tokens_issued=issued)
    tx = hub_with_credentials(
        tmp_path,
        mirrors=(
            MirrorConfig("https://first.example", credentials=CI),
            MirrorConfig("https://second.example"),
        ),
        **{"first.example": first, "second.example": second, "auth.shared.test": service},
    )
    assert tx.get("/v2/alpine/manifests/3.20").status == 200
    assert authorizations(tx, "auth.shared.test") == [BASIC_CI, BASIC]
    assert authorizations(tx, "first.example") == [None, "Bearer token-0"]
    assert authorizations(tx, "second.example") == [None, "Bearer token-1"]


def test_a_mirrors_user_shows_in_health_and_its_password_nowhere(tmp_path, logs):
    company = FakeRegistry(require_basic="ci:wrong")
    tx = hub_with_credentials(
        tmp_path,
        mirrors=(MirrorConfig("https://artifactory.example", credentials=CI),),
        **{"artifactory.example": company},
    )
    failure = tx.get("/v2/alpine/manifests/3.20")
    assert failure.status == 401
    health = tx.upstreams["docker.io"].describe()
    assert health["user"] == "alice"
    assert health["mirrors"][0]["user"] == "ci"
    everything = (
        logs.text() + failure.body.decode() + json.dumps(health) + tx.metrics.render().decode()
    )
    assert CI_PASSWORD not in everything and PASSWORD not in everything
    assert base64.b64encode(f"ci:{CI_PASSWORD}".encode()).decode() not in everything
