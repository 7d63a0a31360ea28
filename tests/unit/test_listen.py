"""Listen descriptions, and TLS listeners whose certificate can be reloaded."""

import pytest
from harness.pki import CertificateAuthority
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock

from txregistry.config import ConfigError
from txregistry.ops.listen import ReloadableTLS, server_endpoint, split_description


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


def test_split_description_honours_escapes():
    assert split_description(r"ssl:5443:privateKey=/k\:ey.pem:interface=\:\:1") == (
        ["ssl", "5443"],
        {"privateKey": "/k:ey.pem", "interface": "::1"},
    )


def test_plain_descriptions_are_twisteds():
    endpoint, tls = server_endpoint(MemoryReactorClock(), "tcp:5050:interface=127.0.0.1")
    assert isinstance(endpoint, TCP4ServerEndpoint) and tls is None


def test_ssl_description_gives_a_reloadable_tls_listener(ca):
    credential = ca.issue("listener")
    endpoint, tls = server_endpoint(
        MemoryReactorClock(),
        f"ssl:5443:privateKey={credential.key}:certKey={credential.cert}:extraCertChain={ca.cert_path}:interface=127.0.0.1",
    )
    assert isinstance(endpoint, SSL4ServerEndpoint)
    assert tls.subject == "listener" and tls.chain == ca.cert_path
    assert tls.getContext() is not None


def test_reload_picks_up_a_new_certificate_and_keeps_the_old_on_a_problem(ca, tmp_path, logs):
    first = ca.issue("first")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    tls = ReloadableTLS(cert, key, None)
    old_context = tls.getContext()

    second = ca.issue("second")
    cert.write_bytes(second.cert.read_bytes())
    key.write_bytes(second.key.read_bytes())
    tls.reload()
    assert tls.subject == "second"
    assert tls.getContext() is not old_context
    assert logs.matching("reloaded TLS certificate")

    key.write_text("garbage")
    tls.reload()
    assert tls.subject == "second"
    assert logs.matching("TLS certificate not reloaded, keeping the old one")


@pytest.mark.parametrize(
    "description, message",
    [
        ("ssl:5443", "needs privateKey=FILE"),
        ("ssl:5443:privateKey=/nonexistent.pem", "cannot read /nonexistent.pem"),
        ("ssl:https:privateKey=/k.pem", "expected ssl:PORT"),
        ("ssl:5443:privateKey=/k.pem:method=TLSv1", "unknown ssl: option 'method'"),
        ("tcp:notaport", "is not a valid endpoint description"),
    ],
)
def test_bad_descriptions_are_config_errors(description, message):
    with pytest.raises(ConfigError) as caught:
        server_endpoint(MemoryReactorClock(), description)
    assert message in str(caught.value)


def test_key_that_does_not_match_the_certificate(ca, tmp_path):
    one, other = ca.issue("one"), ca.issue("other")
    with pytest.raises(ConfigError) as caught:
        ReloadableTLS(one.cert, other.key, None)
    assert str(one.cert) in str(caught.value)
