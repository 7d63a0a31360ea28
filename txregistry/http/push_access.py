"""
Who may push: clients in C{push_from}, and with C{push_users_file}, only
with valid credentials.  Pulls stay open to every client.

How clients decide to send credentials is what shapes this (read in their
sources):

 - Docker (moby's vendored distribution C{registry/client/auth}) takes its
   challenges only from a 401 to its C{/v2/} ping (C{ResponseChallenges});
   with none, it never sends credentials.  With a C{Basic} challenge and no
   credentials, every request fails with "no basic auth credentials"
   (C{basicHandler.AuthorizeRequest}): anonymous pulls would break.  With a
   C{Bearer} challenge it asks the token realm, anonymously when it has no
   credentials, and sends the token.
 - containers/image (skopeo, podman) keeps the challenges of its ping
   whatever its status (C{detectPropertiesHelper}); with C{Basic} it sends
   Basic on every request, empty without credentials; with C{Bearer} it
   asks the realm, with Basic credentials when it has them.
 - containerd answers a 401 to any request from its challenge, Bearer or
   Basic.

So with C{push_users_file}, C{/v2/} answers 401 with a C{Bearer} challenge
whose realm is txregistry's own L{TOKEN_PATH}: it gives any client an
anonymous token (good for pulls, which need none anyway), and a push token
to one that sends valid Basic credentials.  A push then needs a valid push
token, or valid Basic credentials.  Without C{push_users_file}, C{/v2/}
answers 200 as before, and clients in C{push_from} push anonymously.

Tokens are signed with a key made at startup, so a restart makes clients
ask for new ones.  Passwords are checked with bcrypt in the storage's
threads, and remembered (as a hash) for a while when valid, so that a push
of many layers costs one check; no password or token is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Iterable
from typing import Any

import bcrypt
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from txregistry.config import PushUsers
from txregistry.oci.errors import RegistryError
from txregistry.oci.reference import HOST_OR_IPV6_RE
from txregistry.storage.runner import BlockingRunner

TOKEN_PATH = b"/auth/token"
SERVICE = "txregistry"
TOKEN_LIFETIME = 300
# How long a valid password is remembered, so that bcrypt runs once per push.
REMEMBER_VALID = 300.0

_MALFORMED_BASIC = (
    "the Authorization header's Basic credentials are not base64 of USER:PASSWORD:"
    " log in again (docker login, podman login)"
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def denied(message: str) -> RegistryError:
    return RegistryError(403, "DENIED", message)


class PushAccess:
    """Decides whether a request may push, and answers the token realm."""

    log = Logger()

    def __init__(
        self,
        push_from: Iterable[str],
        users: PushUsers | None,
        run_blocking: BlockingRunner,
        clock: IReactorTime,
        key: bytes | None = None,
    ) -> None:
        self._networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in push_from]
        self._push_from = ", ".join(push_from) or "no network"
        self.users = users
        self._run = run_blocking
        self._clock = clock
        self._key = key or os.urandom(32)
        # sha256(user, password) -> when it was last found valid.
        self._valid: dict[bytes, float] = {}

    @property
    def needs_credentials(self) -> bool:
        return self.users is not None

    # The /v2/ ping.

    def challenge(self, request: Request, scope: str | None = None) -> str:
        """The C{WWW-Authenticate} value that sends clients to the token realm."""
        realm = (
            f"{'https' if request.isSecure() else 'http'}://{_host(request)}{TOKEN_PATH.decode()}"
        )
        value = f'Bearer realm="{realm}",service="{SERVICE}"'
        if scope is not None:
            value += f',scope="{scope}"'
        return value

    def unauthorized(self, request: Request, message: str, scope: str | None) -> RegistryError:
        return RegistryError(
            401,
            "UNAUTHORIZED",
            message,
            headers={"WWW-Authenticate": self.challenge(request, scope)},
        )

    # Pushes.

    def check_network(self, request: Request) -> None:
        """@raise RegistryError: 403 C{DENIED} for a client outside C{push_from}."""
        client = request.getClientAddress()
        host = getattr(client, "host", None)
        try:
            address = ipaddress.ip_address(str(host).split("%")[0])
        except ValueError:
            # A UNIX socket: the machine's own users.
            if host is None:
                return
            raise denied(f"pushes come only from {self._push_from}") from None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not any(address in network for network in self._networks):
            raise denied(
                f"client {address} may not push: pushes come only from {self._push_from}"
                " ([server] push_from in txregistry's config)"
            )

    async def check_push(self, request: Request, repository: str) -> str | None:
        """
        Whether C{request} may push to C{repository}: the user, if one was
        needed.

        @raise RegistryError: 403 outside C{push_from}, 401 with a challenge
            without valid credentials.
        """
        self.check_network(request)
        if self.users is None:
            return None
        scope = f"repository:{repository}:pull,push"
        scheme, _, credentials = _authorization(request).partition(" ")
        login = (
            f"pushing needs credentials: docker login {_host(request)} (or podman login;"
            f" users are in {self.users.path})"
        )
        if scheme.lower() == "bearer":
            claims = self._token_claims(credentials.strip())
            if claims is None:
                raise self.unauthorized(
                    request, "the push token is invalid or expired: log in again", scope
                )
            user = claims.get("sub")
            if isinstance(user, str):
                return user
            # An anonymous token, which a client without credentials got.
            raise self.unauthorized(request, login, scope)
        if scheme.lower() == "basic":
            user, password = _basic(credentials)
            if user is None:
                raise self.unauthorized(request, _MALFORMED_BASIC, scope)
            if await self.valid(user, password):
                return user
            raise self.unauthorized(
                request, f"wrong user name or password for user {user[:100]!r}", scope
            )
        raise self.unauthorized(request, login, scope)

    async def valid(self, user: str, password: str) -> bool:
        assert self.users is not None
        hashed = self.users.hash_for(user)
        if hashed is None:
            return False
        remembered = hashlib.sha256(b"%s\0%s\0%s" % (self._key, user.encode(), password.encode()))
        key = remembered.digest()
        now = self._clock.seconds()
        if now - self._valid.get(key, -REMEMBER_VALID) < REMEMBER_VALID:
            return True
        ok: bool = await self._run(_check_password, password.encode(), hashed.reveal().encode())
        if ok:
            self._valid[key] = now
        return ok

    # The token realm.

    async def token(self, request: Request) -> tuple[int, dict[str, Any], dict[str, str]]:
        """
        The answer of L{TOKEN_PATH}: an anonymous token without credentials,
        a push token with valid ones, 401 with wrong ones.
        """
        scheme, _, credentials = _authorization(request).partition(" ")
        user: str | None = None
        name, password = _basic(credentials) if scheme.lower() == "basic" else (None, "")
        if request.method == b"POST":
            # containerd asks with an OAuth2 password grant first (a form).
            args = request.args or {}
            name = (args.get(b"username") or [b""])[0].decode("utf-8", "replace") or None
            password = (args.get(b"password") or [b""])[0].decode("utf-8", "replace")
        if name is not None or scheme.lower() == "basic":
            if name is None or self.users is None or not await self.valid(name, password):
                self.log.info(
                    "refused a push token to {client}: wrong user name or password for {user!r}",
                    client=str(getattr(request.getClientAddress(), "host", "")),
                    user=name[:100] if name else name,
                )
                message = (
                    _MALFORMED_BASIC
                    if name is None
                    else f"wrong user name or password for user {name[:100]!r}"
                )
                body = RegistryError(401, "UNAUTHORIZED", message).body()
                return 401, json.loads(body), {"WWW-Authenticate": f'Basic realm="{SERVICE}"'}
            user = name
        now = self._clock.seconds()
        token = self._sign({"sub": user, "exp": now + TOKEN_LIFETIME})
        document = {
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME,
        }
        return 200, document, {}

    def _sign(self, claims: dict[str, Any]) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
        signature = hmac.new(self._key, payload, hashlib.sha256).digest()
        return (payload + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()

    def ping_authorized(self, request: Request) -> bool:
        """
        Whether a C{/v2/} ping carries a token of ours (anonymous or not):
        C{docker login} checks its token there and wants 200.
        """
        scheme, _, credentials = _authorization(request).partition(" ")
        return scheme.lower() == "bearer" and self._token_claims(credentials.strip()) is not None

    def _token_claims(self, token: str) -> dict[str, Any] | None:
        payload, _, signature = token.encode("latin-1", "replace").partition(b".")
        expected = base64.urlsafe_b64encode(
            hmac.new(self._key, payload, hashlib.sha256).digest()
        ).rstrip(b"=")
        if not hmac.compare_digest(expected, signature):
            return None
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        except (ValueError, binascii.Error):
            return None
        if not isinstance(claims, dict) or claims.get("exp", 0) < self._clock.seconds():
            return None
        return claims


_BCRYPT_PASSWORD_BYTES = 72


def _check_password(password: bytes, hashed: bytes) -> bool:
    # htpasswd -B writes $2y$, which is $2b$ under another name.
    if hashed.startswith(b"$2y$"):
        hashed = b"$2b$" + hashed[4:]
    try:
        # bcrypt reads 72 bytes of a password, and htpasswd -B hashed (and
        # htpasswd -v checks) those; bcrypt 5 refuses a longer one instead,
        # which would lock out a user with a long password.
        return bcrypt.checkpw(password[:_BCRYPT_PASSWORD_BYTES], hashed)
    except ValueError:
        return False


def _authorization(request: Request) -> str:
    value = request.getHeader(b"authorization")
    return value.decode("latin-1").strip() if value else ""


def _basic(credentials: str) -> tuple[str | None, str]:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (ValueError, binascii.Error):
        return None, ""
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and user else (None, "")


def _host(request: Request) -> str:
    """The host the client asked for, as safe to put in a header or message."""
    host = request.getHeader(b"host")
    if host:
        text = host.decode("latin-1")
        if HOST_OR_IPV6_RE.fullmatch(text):
            return text
    address = request.getHost()
    return f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 5050)}"
