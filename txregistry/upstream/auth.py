"""
Authenticating to upstream registries.

Registries answer an unauthenticated request with 401 and a
C{WWW-Authenticate} challenge.  For C{Bearer} (Docker Hub, and distribution
with C{auth: token}) the client asks the challenge's realm for a token for a
scope such as C{repository:library/alpine:pull}, then sends
C{Authorization: Bearer <token>}.  See the token authentication spec,
https://distribution.github.io/distribution/spec/auth/token/ .

Tokens are reused per realm, service and scope until shortly before their
C{expires_in} runs out.

Credentials go to the token service as Basic auth, never to the registry as
a Bearer token's stand-in: Docker Hub's registry API accepts only Bearer
tokens.  A registry that challenges with C{Basic} gets them directly, which
L{txregistry.upstream.client} decides, by the mirror's host.  Which
credentials (a mirror's own, or its registry's) is part of a token's key, so
that two mirrors sharing a token service never share a token.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from txregistry.config import Credentials
from txregistry.repository.singleflight import SingleFlight
from txregistry.upstream.bodies import TimedOut, describe_failure, read_body, within

# The token spec: "When omitted, this defaults to 60 seconds."
DEFAULT_TOKEN_LIFETIME = 60.0
MAX_TOKEN_RESPONSE = 1 << 20

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})")
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*({_TOKEN}|{_QUOTED})\s*")
_TOKEN68_RE = re.compile(r"\s*([A-Za-z0-9._~+/-]+=*)\s*(?=,|$)")


class AuthError(Exception):
    """
    Getting a token failed; the message is safe to log and show.

    @ivar status: the token service's HTTP status, if it answered.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def basic_authorization(credentials: Credentials) -> bytes:
    """The C{Authorization} header value for Basic auth with C{credentials}."""
    pair = f"{credentials.username}:{credentials.password.reveal()}".encode()
    return b"Basic " + base64.b64encode(pair)


@dataclass(frozen=True)
class Challenge:
    """One challenge of a C{WWW-Authenticate} header."""

    scheme: str  # lower case: "bearer", "basic"
    params: Mapping[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_www_authenticate(values: Iterable[str]) -> list[Challenge]:
    """
    Parse C{WWW-Authenticate} header values (RFC 9110 section 11.6.1), which
    may hold several challenges each, such as
    C{Bearer realm="https://auth.docker.io/token",service="registry.docker.io"}.
    Unparseable text ends the parse rather than raising: a registry's
    malformed header must not become our error.
    """
    challenges: list[Challenge] = []
    for value in values:
        pos = 0
        while pos < len(value):
            if value[pos] in ", \t":
                pos += 1
                continue
            scheme = _SCHEME_RE.match(value, pos)
            if scheme is None:
                break
            pos = scheme.end()
            params: dict[str, str] = {}
            token68 = _TOKEN68_RE.match(value, pos)
            if token68 is not None and "=" not in value[pos : token68.end()].rstrip("="):
                pos = token68.end()
            else:
                pos = _parse_params(value, pos, params)
            challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


def _parse_params(value: str, pos: int, params: dict[str, str]) -> int:
    while True:
        param = _PARAM_RE.match(value, pos)
        if param is None:
            return pos
        name, raw = param.groups()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name.lower()] = raw
        pos = param.end()
        if pos < len(value) and value[pos] == ",":
            # A comma separates parameters, or ends this challenge if what
            # follows is a new scheme rather than name=value.
            if _PARAM_RE.match(value, pos + 1) is None:
                return pos
            pos += 1


def pull_scope(repository: str) -> str:
    """The token scope for pulling from a repository."""
    return f"repository:{repository}:pull"


@dataclass(frozen=True)
class TokenKey:
    """
    What a token is for, and whose it is: fetched with C{credentials} (a
    mirror's, or its registry's), or anonymously when they are L{None}.
    Their password is a L{txregistry.config.Secret}, so a key can be logged.
    """

    realm: str
    service: str
    scope: str
    credentials: Credentials | None = None


@dataclass
class _Token:
    value: str
    usable_until: float


class TokenCache:
    """
    Tokens by realm, service and scope, each kept until a margin before it
    expires so that it cannot run out in flight.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._tokens: dict[TokenKey, _Token] = {}

    def get(self, key: TokenKey) -> str | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if self._clock.seconds() >= token.usable_until:
            del self._tokens[key]
            return None
        return token.value

    def put(self, key: TokenKey, value: str, expires_in: float) -> None:
        margin = min(30.0, expires_in * 0.2)
        self._tokens[key] = _Token(value, self._clock.seconds() + expires_in - margin)

    def discard(self, key: TokenKey) -> None:
        self._tokens.pop(key, None)


def token_key(
    challenge: Challenge, scope: str, credentials: Credentials | None = None
) -> TokenKey | None:
    """
    The cache key for a Bearer challenge, or L{None} if the challenge has no
    usable realm.  The challenge's own scope wins over the one we guessed.
    """
    realm = challenge.realm
    if realm is None or urlsplit(realm).scheme not in ("http", "https"):
        return None
    return TokenKey(
        realm=realm,
        service=challenge.params.get("service", ""),
        scope=challenge.params.get("scope", scope),
        credentials=credentials,
    )


def _token_url(key: TokenKey) -> bytes:
    query: list[tuple[str, str]] = []
    if key.service:
        query.append(("service", key.service))
    # A challenge may ask for several scopes, separated by spaces.
    query.extend(("scope", scope) for scope in key.scope.split(" ") if scope)
    separator = "&" if urlsplit(key.realm).query else "?"
    return (key.realm + separator + urlencode(query)).encode("ascii")


def _parse_token_response(body: bytes) -> tuple[str, float]:
    try:
        document: Any = json.loads(body)
    except ValueError:
        raise AuthError("token service returned invalid JSON") from None
    if not isinstance(document, dict):
        raise AuthError("token service returned JSON that is not an object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthError("token service returned no token")
    expires_in = document.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if not isinstance(expires_in, (int, float)) or expires_in <= 0:
        expires_in = DEFAULT_TOKEN_LIFETIME
    return token, float(expires_in)


class TokenFetcher:
    """
    Gets Bearer tokens from a registry's token service and caches them.
    Concurrent requests for the same token share one fetch.
    """

    log = Logger()

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        registry: str,
        timeout: float = 30.0,
    ) -> None:
        self._agent = agent
        self._clock = clock
        self._cache = TokenCache(clock)
        self._registry = registry
        self._timeout = timeout
        self._fetches: SingleFlight[TokenKey, str] = SingleFlight()

    def discard(self, key: TokenKey) -> None:
        self._cache.discard(key)

    def token(self, key: TokenKey) -> Deferred[str]:
        """A token for C{key}: the cached one, or a fresh one."""
        cached = self._cache.get(key)
        if cached is not None:
            return succeed(cached)
        return self._fetches.run(key, lambda: self._fetch(key))

    async def _fetch(self, key: TokenKey) -> str:
        headers = Headers({b"User-Agent": [b"txregistry"]})
        user = ""
        if key.credentials is not None:
            headers.setRawHeaders(b"Authorization", [basic_authorization(key.credentials)])
            user = f" for user {key.credentials.username}"
        request = self._agent.request(b"GET", _token_url(key), headers)
        try:
            response: IResponse = await within(self._timeout, self._clock, request)
        except TimedOut:
            raise AuthError(
                f"token service {key.realm} sent no answer within {self._timeout:g}s"
            ) from None
        except Exception as e:
            raise AuthError(
                f"token service {key.realm} unreachable: {describe_failure(e)}"
            ) from None
        try:
            body = await read_body(response, MAX_TOKEN_RESPONSE)
        except Exception as e:
            raise AuthError(f"token service {key.realm}: {describe_failure(e)}") from None
        if response.code != 200:
            raise AuthError(
                f"token service {key.realm} answered HTTP {response.code}{user}", response.code
            )
        token, expires_in = _parse_token_response(body)
        self._cache.put(key, token, expires_in)
        self.log.debug(
            "got a token for {registry} scope {scope}, valid {expires_in}s",
            registry=self._registry,
            scope=key.scope,
            expires_in=expires_in,
        )
        return token
