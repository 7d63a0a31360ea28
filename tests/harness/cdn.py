"""
A push origin as the field has them: distribution with htpasswd auth behind
a real nginx, which stands in for a CDN or a TLS terminator.

nginx has two servers in front of the one registry:

 - C{limited_url}: plain HTTP with C{client_max_body_size 100m} and
   C{proxy_request_buffering off}, a CDN's 100 MB body limit (Cloudflare's
   Free and Pro plans).  It passes C{X-Forwarded-Proto}.
 - C{tls_url}: HTTPS, without C{X-Forwarded-Proto}: distribution then
   builds its C{Location} headers with C{http://}, the misconfiguration of
   distribution #996 and #2225.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from harness.network import free_port
from harness.pki import CertificateAuthority
from harness.processes import Process
from harness.registry import DistributionRegistry

BODY_LIMIT = 100 << 20


def nginx_binary() -> str:
    for candidate in ("/usr/sbin/nginx", shutil.which("nginx")):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("nginx is not installed: apt-get install nginx")


class CdnOrigin:
    """distribution (htpasswd auth for C{user}) behind nginx; see the module docstring."""

    def __init__(self, directory: Path, ca: CertificateAuthority, user: str, password: str) -> None:
        self.directory = directory
        self.user = user
        self.password = password
        directory.mkdir(parents=True, exist_ok=True)
        htpasswd = directory / "htpasswd"
        done = subprocess.run(
            ["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True
        )
        htpasswd.write_text(done.stdout)
        self.registry = DistributionRegistry(
            directory / "registry", auth={"htpasswd": {"realm": "origin", "path": str(htpasswd)}}
        ).start()
        try:
            self.nginx = self._start_nginx(directory / "nginx", ca)
        except BaseException:
            self.registry.stop()
            raise

    def _start_nginx(self, directory: Path, ca: CertificateAuthority) -> Process:
        directory.mkdir(parents=True, exist_ok=True)
        credential = ca.issue("cdn")
        limited, tls = free_port(), free_port()
        user = "user root;" if os.geteuid() == 0 else ""
        temp = " ".join(
            f"{kind}_temp_path {directory / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        upstream = f"http://127.0.0.1:{self.registry.port}"
        common = """
            client_max_body_size 100m;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        """
        config = directory / "nginx.conf"
        config.write_text(
            f"""
            {user}
            worker_processes 1;
            daemon off;
            pid {directory / "nginx.pid"};
            error_log stderr notice;
            events {{ worker_connections 256; }}
            http {{
                access_log {directory / "access.log"};
                {temp}
                server {{
                    listen 127.0.0.1:{limited};
                    location / {{
                        {common}
                        proxy_set_header X-Forwarded-Proto $scheme;
                        proxy_pass {upstream};
                    }}
                }}
                server {{
                    listen 127.0.0.1:{tls} ssl;
                    ssl_certificate {credential.chain};
                    ssl_certificate_key {credential.key};
                    location / {{
                        {common}
                        proxy_pass {upstream};
                    }}
                }}
            }}
            """
        )
        process = Process(
            [nginx_binary(), "-p", str(directory), "-e", "stderr", "-c", str(config)],
            log=directory / "nginx.log",
        )
        process.wait_for("start worker process")
        self.limited_url = f"http://127.0.0.1:{limited}"
        self.tls_url = f"https://127.0.0.1:{tls}"
        return process

    def stop(self) -> None:
        self.nginx.stop()
        self.registry.stop()
