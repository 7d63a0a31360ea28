"""
A registry token service for tests, run as its own process:

    python -m harness.token_server --cert C --key K --service S --issuer I [--user U:P]

It implements the token authentication spec's GET endpoint well enough for
distribution's C{auth: token}: JWTs signed with RS256 and carrying the
signing certificate in C{x5c}.  With C{--user}, it requires that Basic
auth.  Each request is printed, so that tests can count them and check
what was sent (credentials are printed as a user name only).
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--user", help="USER:PASSWORD that must be sent as Basic auth")
    parser.add_argument("--lifetime", type=int, default=300)
    options = parser.parse_args()

    with open(options.cert, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(options.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]

    def token(scopes: list[str], subject: str) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": x5c}
        claims = {
            "iss": options.issuer,
            "sub": subject,
            "aud": options.service,
            "exp": now + options.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        )
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            user = "-"
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user = base64.b64decode(auth[6:]).decode().split(":", 1)[0]
            if options.user and auth != "Basic " + base64.b64encode(options.user.encode()).decode():
                print(f"TOKEN refused user={user}", flush=True)
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="token"')
                self.end_headers()
                return
            scopes = query.get("scope", [])
            service = query.get("service", [""])[0]
            print(f"TOKEN scope={' '.join(scopes)} service={service} user={user}", flush=True)
            issued = token(scopes, user)
            # Printed so that tests can check it appears in no log of txregistry's.
            print(f"ISSUED {issued}", flush=True)
            body = json.dumps({"token": issued, "expires_in": options.lifetime}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
