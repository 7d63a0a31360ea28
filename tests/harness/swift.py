"""
OpenStack Swift with its S3 layer (s3api), as the tests' S3 server.

One node on loopback: memcached, and an account, a container and an object
server, each a process of its own, with one-replica rings built by
C{swift-ring-builder}, over a temporary directory that must support user
xattrs (the object server keeps its metadata in them), and the proxy with
C{s3api}, C{tempauth} and C{slo} (which s3api's multipart uploads need).
tempauth's user C{test:tester} is the S3 access key C{test:tester} with
secret C{testing}.

Swift runs from a virtualenv of its own (C{.venv-swift}, made by
C{tests/run}; C{TXREGISTRY_SWIFT_VENV} overrides it): it pulls in eventlet
and pins of its own that have no business in txregistry's environment.

Readiness is waited on by polling each server (the deadline is only a
guard against a hang).  The proxy can be stopped and started again on the
same port, for tests of a bucket that goes away.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.processes import HANG_GUARD, Process

ROOT = Path(__file__).parents[2]
ACCESS_KEY = "test:tester"
SECRET_KEY = "testing"
REGION = "us-east-1"
# The bucket the tests share (each test under a prefix of its own).
BUCKET = "txregistry"


def swift_venv() -> Path:
    venv = Path(os.environ.get("TXREGISTRY_SWIFT_VENV", ROOT / ".venv-swift"))
    if not (venv / "bin" / "swift-proxy-server").exists():
        raise RuntimeError(
            f"OpenStack Swift is not installed in {venv}: run tests/run --setup-only,"
            " or set TXREGISTRY_SWIFT_VENV to a virtualenv with swift installed"
        )
    return venv


def free_port() -> int:
    """A loopback port free now (Swift's rings need the ports before the servers start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_xattrs(directory: Path) -> None:
    probe = directory / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.txregistry", b"1")
    except OSError as e:
        raise RuntimeError(
            f"{directory} has no user xattrs ({e}), which Swift's object server needs:"
            " run the tests with a temporary directory on ext4 or xfs (pytest --basetemp)"
        ) from e
    finally:
        probe.unlink()


_SERVER_CONF = """\
[DEFAULT]
devices = {devices}
mount_check = false
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
swift_dir = {swift_dir}
log_name = {kind}-server
log_level = WARNING

[pipeline:main]
pipeline = {kind}-server

[app:{kind}-server]
use = egg:swift#{kind}
"""

_PROXY_CONF = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
swift_dir = {swift_dir}
log_name = proxy-server
log_level = INFO

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth
    copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcached_port}

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:s3api]
use = egg:swift#s3api
location = {region}
s3_acl = false
check_bucket_owner = false

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = {secret} .admin

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
"""


class Swift:
    """A one-node Swift with s3api on loopback, in C{directory}."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.venv = swift_venv()
        self.port = 0
        self.processes: dict[str, Process] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Swift:
        self.directory.mkdir(parents=True, exist_ok=True)
        devices = self.directory / "srv"
        (devices / "d1").mkdir(parents=True, exist_ok=True)
        _check_xattrs(devices / "d1")
        swift_dir = self.directory / "etc"
        swift_dir.mkdir(exist_ok=True)
        (swift_dir / "swift.conf").write_text(
            "[swift-hash]\nswift_hash_path_suffix = txregistry-tests\n"
            "swift_hash_path_prefix = txregistry\n\n"
            "[storage-policy:0]\nname = only\ndefault = yes\n"
        )
        memcached_port = free_port()
        user = ["-u", "root"] if os.getuid() == 0 else []
        self.processes["memcached"] = Process(
            [
                "memcached",
                *user,
                "-l",
                "127.0.0.1",
                "-p",
                str(memcached_port),
                "-U",
                "0",
                "-m",
                "16",
            ],
            log=self.directory / "memcached.log",
        )
        ports = {kind: free_port() for kind in ("account", "container", "object")}
        for kind, port in ports.items():
            builder = str(swift_dir / f"{kind}.builder")
            ring_builder = str(self.venv / "bin" / "swift-ring-builder")
            # create <part_power> <replicas> <min_part_hours>
            subprocess.run(
                [ring_builder, builder, "create", "6", "1", "1"], check=True, capture_output=True
            )
            subprocess.run(
                [ring_builder, builder, "add", f"r1z1-127.0.0.1:{port}/d1", "1"],
                check=True,
                capture_output=True,
            )
            # rebalance exits 1 for a warning (one device), 2 for an error.
            rebalanced = subprocess.run([ring_builder, builder, "rebalance"], capture_output=True)
            if rebalanced.returncode > 1:
                raise RuntimeError(f"swift-ring-builder {kind} rebalance: {rebalanced.stdout!r}")
        for kind, port in ports.items():
            conf = self.directory / f"{kind}-server.conf"
            conf.write_text(
                _SERVER_CONF.format(devices=devices, port=port, swift_dir=swift_dir, kind=kind)
            )
            self.processes[kind] = self._server(f"swift-{kind}-server", conf, kind)
        self.port = self.port or free_port()
        self._proxy_conf = self.directory / "proxy-server.conf"
        self._proxy_conf.write_text(
            _PROXY_CONF.format(
                port=self.port,
                swift_dir=swift_dir,
                memcached_port=memcached_port,
                region=REGION,
                secret=SECRET_KEY,
            )
        )
        for kind, port in ports.items():
            self._wait_listening(kind, port)
        self._wait_listening("memcached", memcached_port)
        self.start_proxy()
        return self

    def _server(self, program: str, conf: Path, name: str) -> Process:
        return Process(
            [str(self.venv / "bin" / program), str(conf), "--verbose"],
            log=self.directory / f"{name}.log",
        )

    def _wait_listening(self, name: str, port: int) -> None:
        deadline = time.monotonic() + HANG_GUARD
        while True:
            process = self.processes[name]
            if process.popen.poll() is not None:
                raise AssertionError(
                    f"swift's {name} exited ({process.popen.returncode}):\n"
                    + "\n".join(process.lines[-30:])
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"swift's {name} is not listening on {port}") from None
                # Polling a port that is coming up: the wait is for the
                # condition, bounded by the guard.
                time.sleep(0.05)

    def start_proxy(self) -> None:
        """Start (or restart, on the same port) the proxy, and wait until it answers."""
        self.processes["proxy"] = self._server("swift-proxy-server", self._proxy_conf, "proxy")
        deadline = time.monotonic() + HANG_GUARD
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/healthcheck", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            proxy = self.processes["proxy"]
            if proxy.popen.poll() is not None:
                raise AssertionError(
                    f"swift's proxy exited ({proxy.popen.returncode}):\n"
                    + "\n".join(proxy.lines[-30:])
                )
            if time.monotonic() > deadline:
                raise AssertionError("swift's proxy does not answer /healthcheck")
            time.sleep(0.05)

    def stop_proxy(self) -> None:
        """The S3 endpoint goes away (its port refuses connections) until L{start_proxy}."""
        self.processes["proxy"].stop()

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()


def botocore_client(endpoint: str):
    """A plain, blocking botocore client, for the tests' own setup and checks."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def create_bucket(endpoint: str, bucket: str, deadline: float = 30.0) -> None:
    """
    Create C{bucket}, asking again while Swift, just started, answers 503
    ("Please reduce your request rate") because its rings and memcached are
    not all ready yet; the deadline only guards against a Swift that never is.
    """
    import time

    import botocore.exceptions

    client = botocore_client(endpoint)
    give_up = time.monotonic() + deadline
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except botocore.exceptions.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status not in (500, 503) or time.monotonic() > give_up:
                raise
        time.sleep(0.2)
