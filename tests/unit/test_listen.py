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
        ("ssl:99999:privateKey=/k.pem", "port '99999' is not a port number (0 to 65535)"),
        ("ssl:5443:privateKey=/k.pem:backlog=many", "backlog='many' is not a whole number"),
        ("tcp:notaport", "port 'notaport' is not a port number (0 to 65535)"),
        ("tcp:50x50", "port '50x50' is not a port number (0 to 65535): use tcp:PORT"),
        ("tcp:70000", "port '70000' is not a port number"),
        ("tcp:", "port '' is not a port number"),
        ("tcp", "no port: use tcp:PORT"),
        ("tcp:port=x", "port 'x' is not a port number"),
        ("tcp6:5050x", "port '5050x' is not a port number (0 to 65535): use tcp6:PORT"),
        ("tcp:5050:interface=127.0.0.1:backlog=x", "backlog='x' is not a whole number"),
        ("tcp:5050:bogus=1", "unknown tcp: option 'bogus' (known: port, interface, backlog)"),
        ("tcp:5050:interface=127.0.0.1:extra", "interface is given twice"),
        ("tcp:5050:1.2.3.4:50:more", "unexpected 'more'"),
        ("unix:/run/txregistry.sock:mode=999", "mode='999' is not an octal number"),
        ("unix:/run/txregistry.sock:lockfile=yes", "lockfile='yes' is not 0 or 1"),
        ("systemd:domain=INET", "give exactly one of index= and name="),
        ("systemd:domain=IPX:index=0", "domain='IPX' is not one of INET, INET6, UNIX"),
        ("systemd:domain=INET:index=first", "index='first' is not a whole number"),
        ("systemd:domain=INET:index=7", "systemd passed no such socket"),
        ("haproxy:tcp:x", "'haproxy:tcp:x': port 'x' is not a port number"),
        ("5050", "unknown endpoint type '5050': use one of tcp:PORT"),
        ("TCP:5050", "unknown endpoint type 'TCP'"),
        ("quic:5050", "unknown endpoint type 'quic'"),
    ],
)
def test_bad_descriptions_are_config_errors(description, message):
    with pytest.raises(ConfigError) as caught:
        server_endpoint(MemoryReactorClock(), description)
    assert message in str(caught.value)
    # What is wrong in words, never the Python error Twisted's parsers raise.
    for python in ("int()", "literal", "argument", "index out of range", "Traceback"):
        assert python not in str(caught.value)


@pytest.mark.parametrize(
    "description",
    [
        "tcp:0",
        "tcp:port=5050:backlog=10",
        "tcp6:5050:interface=\\:\\:1",
        "unix:/run/txregistry.sock:mode=660:lockfile=1",
        "haproxy:tcp:5050",
    ],
)
def test_good_descriptions_pass_the_checks(description):
    endpoint, tls = server_endpoint(MemoryReactorClock(), description)
    assert endpoint is not None and tls is None


def test_key_that_does_not_match_the_certificate(ca, tmp_path):
    one, other = ca.issue("one"), ca.issue("other")
    with pytest.raises(ConfigError) as caught:
        ReloadableTLS(one.cert, other.key, None)
    assert str(one.cert) in str(caught.value)
