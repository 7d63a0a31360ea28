"""WWW-Authenticate parsing, token reuse and expiry."""

import json

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from txregistry.upstream.auth import (
    AuthError,
    Challenge,
    TokenFetcher,
    TokenKey,
    parse_www_authenticate,
    token_key,
)

HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/alpine:pull"'
)


def test_docker_hub_challenge():
    (challenge,) = parse_www_authenticate([HUB])
    assert challenge == Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/alpine:pull",
        },
    )


def test_several_challenges_in_one_header():
    challenges = parse_www_authenticate(
        ['Basic realm="Registry Realm", Bearer realm="https://a/t",service=s']
    )
    assert [(c.scheme, dict(c.params)) for c in challenges] == [
        ("basic", {"realm": "Registry Realm"}),
        ("bearer", {"realm": "https://a/t", "service": "s"}),
    ]


def test_quoted_strings_with_escapes_and_commas():
    (challenge,) = parse_www_authenticate(
        ['Bearer realm="https://a/t?x=1,2", error="say \\"hi\\""']
    )
    assert challenge.params == {"realm": "https://a/t?x=1,2", "error": 'say "hi"'}


def test_token68_and_schemes_without_params():
    challenges = parse_www_authenticate(["Negotiate abc123==, Basic"])
    assert [c.scheme for c in challenges] == ["negotiate", "basic"]


@pytest.mark.parametrize(
    "garbage", ['"', "=", ",,,", "Bearer realm=", 'Bearer realm="unterminated']
)
def test_garbage_never_raises(garbage):
    assert isinstance(parse_www_authenticate([garbage]), list)


def test_token_key_prefers_the_challenges_scope_and_needs_an_http_realm():
    (challenge,) = parse_www_authenticate([HUB])
    assert token_key(challenge, "repository:other:pull") == TokenKey(
        "https://auth.docker.io/token", "registry.docker.io", "repository:library/alpine:pull"
    )
    assert token_key(Challenge("bearer", {"realm": "file:///etc/passwd"}), "x") is None
    assert token_key(Challenge("bearer", {}), "x") is None


class TokenService(Resource):
    isLeaf = True

    def __init__(self, lifetime=None, body=None, code=200):
        super().__init__()
        self.requests = []
        self.lifetime = lifetime
        self.body = body
        self.code = code

    def render_GET(self, request):
        self.requests.append(request.uri.decode())
        request.setResponseCode(self.code)
        if self.body is not None:
            return self.body
        document = {"token": f"t{len(self.requests)}"}
        if self.lifetime is not None:
            document["expires_in"] = self.lifetime
        return json.dumps(document).encode()


KEY = TokenKey("https://auth.example/token", "registry.example", "repository:library/alpine:pull")


def result_of(d, agent):
    agent.flush()
    results = []
    d.addBoth(results.append)
    assert results, "token fetch did not finish"
    return results[0]


def test_token_request_carries_service_and_scope():
    service = TokenService(lifetime=300)
    agent = RequestTraversalAgent(service)
    fetcher = TokenFetcher(agent, Clock(), "example")
    assert result_of(fetcher.token(KEY), agent) == "t1"
    assert service.requests == [
        "/token?service=registry.example&scope=repository%3Alibrary%2Falpine%3Apull"
    ]


def test_token_is_reused_until_shortly_before_it_expires():
    service = TokenService(lifetime=300)
    agent = RequestTraversalAgent(service)
    clock = Clock()
    fetcher = TokenFetcher(agent, clock, "example")
    assert result_of(fetcher.token(KEY), agent) == "t1"
    clock.advance(269)
    assert result_of(fetcher.token(KEY), agent) == "t1"
    clock.advance(1)  # 300s less a 30s margin
    assert result_of(fetcher.token(KEY), agent) == "t2"
    assert len(service.requests) == 2


def test_default_lifetime_is_sixty_seconds():
    service = TokenService(lifetime=None)
    agent = RequestTraversalAgent(service)
    clock = Clock()
    fetcher = TokenFetcher(agent, clock, "example")
    result_of(fetcher.token(KEY), agent)
    clock.advance(47)
    assert result_of(fetcher.token(KEY), agent) == "t1"
    clock.advance(1)  # 60s less a 12s margin
    assert result_of(fetcher.token(KEY), agent) == "t2"


def test_concurrent_requests_share_one_fetch():
    service = TokenService(lifetime=300)
    agent = RequestTraversalAgent(service)
    fetcher = TokenFetcher(agent, Clock(), "example")
    first, second = fetcher.token(KEY), fetcher.token(KEY)
    assert (result_of(first, agent), result_of(second, agent)) == ("t1", "t1")
    assert len(service.requests) == 1


def test_tokens_are_per_scope():
    service = TokenService(lifetime=300)
    agent = RequestTraversalAgent(service)
    fetcher = TokenFetcher(agent, Clock(), "example")
    other = TokenKey(KEY.realm, KEY.service, "repository:library/redis:pull")
    assert result_of(fetcher.token(KEY), agent) == "t1"
    assert result_of(fetcher.token(other), agent) == "t2"


@pytest.mark.parametrize(
    "code, body, message",
    [
        (500, b"oops", "answered HTTP 500"),
        (200, b"not json", "invalid JSON"),
        (200, b"[]", "not an object"),
        (200, b'{"expires_in": 60}', "no token"),
    ],
)
def test_token_service_failures(code, body, message):
    agent = RequestTraversalAgent(TokenService(code=code, body=body))
    fetcher = TokenFetcher(agent, Clock(), "example")
    failure = result_of(fetcher.token(KEY), agent)
    assert failure.check(AuthError)
    assert message in failure.getErrorMessage()
