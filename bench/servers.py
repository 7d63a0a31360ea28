"""
The servers a benchmark runs, each a child process on loopback.

Their output goes to a log file.  The bench reads it in bulk, never line by
line, so that a server logging every request (as txregistry and the
distribution registry both do by default) costs the machine the same as it
would in production, and not a Python thread parsing each line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).parents[1]

# Guards against a hung child, never a measurement.
HANG_GUARD = 120.0

_ACCESS_RE = re.compile(rb'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3})')


class Server:
    """A child process whose output is copied to C{log_path} as it comes."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        directory: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = directory / f"{name}.log"
        self._log = open(self.log_path, "wb", buffering=0)
        self._size = 0
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            list(args),
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._copier = threading.Thread(target=self._copy, daemon=True)
        self._copier.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _copy(self) -> None:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            self._log.write(chunk)
            with self._changed:
                self._size += len(chunk)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def log(self, start: int = 0) -> bytes:
        """What the server has printed, from byte C{start} on."""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return f.read()

    def offset(self) -> int:
        with self._changed:
            return self._size

    def wait_for(self, pattern: str, start: int = 0) -> re.Match[bytes]:
        """
        The first match of C{pattern} in the output from byte C{start} on;
        its offsets count from C{start}.
        """
        regex = re.compile(pattern.encode())
        with self._changed:
            while True:
                match = regex.search(self.log(start))
                if match:
                    return match
                if not self._copier.is_alive():
                    raise RuntimeError(
                        f"{self.name} exited ({self.popen.poll()}) before printing {pattern!r}:\n"
                        + self.log()[-3000:].decode(errors="replace")
                    )
                if not self._changed.wait(HANG_GUARD):
                    raise RuntimeError(f"{self.name} printed no {pattern!r}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(HANG_GUARD)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(HANG_GUARD)
        self._copier.join(HANG_GUARD)
        self._log.close()


class Registry(Server):
    """
    The CNCF distribution registry (Debian's docker-registry): the upstream,
    or, with C{proxy_for}, the peer, a pull-through cache of that upstream.
    """

    def __init__(self, name: str, directory: Path, proxy_for: str | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.storage = directory / "data"
        config: dict[str, object] = {
            "version": 0.1,
            # Its defaults: info level, with an access log.
            "log": {"level": "info"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}},
            "http": {"addr": "127.0.0.1:0", "secret": "bench"},
        }
        if proxy_for is not None:
            config["proxy"] = {"remoteurl": proxy_for}
        path = directory / f"{name}.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        super().__init__(name, [_which("docker-registry"), "serve", str(path)], directory)
        port = int(self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")[1])
        self.host = f"127.0.0.1:{port}"
        self.port = port
        self.url = f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes on disk."""
        hex_digest = digest.split(":", 1)[1]
        return (
            self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
        )

    def mark(self) -> int:
        """
        A point in the log after every request answered so far.  The
        registry logs a request before it finishes the response, so a marker
        request's line comes after all of theirs.
        """
        marker = uuid.uuid4().hex
        start = self.offset()
        urllib.request.urlopen(f"{self.url}/v2/?marker={marker}").close()
        return start + self.wait_for(marker, start).end()

    def blob_gets(self, digest: str, since: int, until: int) -> int:
        """How many times the blob was asked for with GET between two marks."""
        return sum(
            1
            for match in _ACCESS_RE.finditer(self.log(since)[: until - since])
            if match[1] == b"GET" and match[2].endswith(f"/blobs/{digest}".encode())
        )


class TxRegistry(Server):
    """txregistry from this checkout, run with C{twistd} as users run it."""

    def __init__(
        self,
        directory: Path,
        upstream_url: str,
        port: int,
        admin_port: int,
        name: str = "txregistry",
        peers: list[str] | None = None,
        extra_config: str = "",
        extra_env: dict[str, str] | None = None,
        registry_keys: str = "",
    ) -> None:
        """
        C{peers}, with this node's own URL among them, makes it a fleet node.

        @param extra_config: TOML tables added to the config (C{[storage]}
            for the bucket scenario), with C{extra_env} (its keys).
        @param registry_keys: more lines for its C{[[registry]]} table.
        """
        directory.mkdir(parents=True, exist_ok=True)
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        fleet = ""
        if peers is not None:
            listed = ", ".join(f'"{peer}"' for peer in peers)
            fleet = f'[fleet]\nself = "{self.url}"\npeers = [{listed}]\n'
        config = directory / "txregistry.toml"
        config.write_text(
            f"""
            [server]
            listen = ["tcp:{port}:interface=127.0.0.1"]
            admin_listen = ["tcp:{admin_port}:interface=127.0.0.1"]
            [cache]
            directory = "{directory / "cache"}"
            size_limit = "64GiB"
            [[registry]]
            name = "docker.io"
            mirrors = ["{upstream_url}"]
            {registry_keys}
            # The push scenario's: a hosted registry, and push-through to
            # the upstream (its origin).
            [[registry]]
            name = "local"
            hosted = true
            [[registry]]
            name = "origin.bench"
            mirrors = ["{upstream_url}"]
            push = true
            """.replace("\n            ", "\n")
            + fleet
            + extra_config
        )
        twistd = str(Path(sys.executable).parent / "twistd")
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(directory)}
        env.update(extra_env or {})
        args = [twistd, "-n", "--pidfile=", "txregistry", "--config", str(config)]
        super().__init__(name, args, directory, env)
        self.wait_for("txregistry ready")


class ThrottleProxy(Server):
    """
    The tests' fault proxy (tests/harness/faults.py) in front of the
    upstream, sending each response at C{rate} bytes a second: an upstream
    that limits each connection, as blob storage does.
    """

    def __init__(self, directory: Path, target_port: int, rate: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        script = ROOT / "tests" / "harness" / "faults.py"
        args = [sys.executable, str(script), "--target", str(target_port), "--throttle", str(rate)]
        super().__init__("throttle", args, directory)
        port = int(self.wait_for(r"listening on (\d+)")[1])
        self.url = f"http://127.0.0.1:{port}"


class Nginx(Server):
    """
    nginx serving a directory from disk on two ports, one with sendfile on
    and one with it off: the practical ceiling for bytes from disk to a
    socket.  One worker process, as txregistry is one process.
    """

    def __init__(self, directory: Path, root: Path, ports: tuple[int, int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        temp = " ".join(
            f"{kind}_temp_path {directory / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        servers = "".join(
            f"server {{ listen 127.0.0.1:{port}; root {root}; sendfile {mode}; }}\n"
            for port, mode in zip(ports, ("on", "off"), strict=True)
        )
        config = directory / "nginx.conf"
        config.write_text(
            f"""
            {user}
            worker_processes 1;
            daemon off;
            pid {directory / "nginx.pid"};
            error_log stderr notice;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                default_type application/octet-stream;
                {temp}
                {servers}
            }}
            """
        )
        args = [_which("nginx"), "-p", str(directory), "-e", "stderr", "-c", str(config)]
        super().__init__("nginx", args, directory)
        # Logged once the master process has bound both ports.
        self.wait_for("start worker process")
        self.sendfile_url = f"http://127.0.0.1:{ports[0]}"
        self.copy_url = f"http://127.0.0.1:{ports[1]}"


def _which(program: str) -> str:
    for directory in ("/usr/sbin", "/usr/bin", *os.environ.get("PATH", "").split(":")):
        path = Path(directory) / program
        if path.exists():
            return str(path)
    raise RuntimeError(f"{program} is not installed: run bench/run, which installs it")
