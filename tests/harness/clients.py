"""
The real clients, each with state of its own: Debian's Docker daemon and
CLI, podman, and containerd with ctr.

Each runs as root with a data root, sockets and configuration in a
directory of its own, so that nothing of the machine's own Docker,
containerd or podman is read or changed, and every byte it stores is
removed at the end (vfs data roots are large).  Nothing here contacts a
public registry: images are pulled from and pushed to registries on
loopback.

Daemons are started synchronously (in fixtures) and waited on by the lines
they log; their commands run asynchronously, so that a txregistry in the
test's own process keeps answering while a client talks to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from harness.processes import HANG_GUARD, Process

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ClientFailed(AssertionError):
    """A client command exited non-zero; its output says why."""

    def __init__(self, args: Sequence[str], code: int | None, out: str, err: str) -> None:
        how = f"exited {code}" if code is not None else f"hung for {HANG_GUARD:.0f}s and was killed"
        super().__init__(f"{' '.join(args)} {how}:\n{err}{out}")
        self.code = code
        self.out = out
        self.err = err


class _Collect(ProcessProtocol):
    def __init__(self, stdin: bytes | None) -> None:
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else reason.value.exitCode
        self.done.callback(code)


async def run(args: Sequence[str], env: dict[str, str], stdin: str | None = None) -> str:
    """
    Run a client command while the reactor keeps running; return its
    standard output, or raise L{ClientFailed} with everything it printed.
    """
    collect = _Collect(stdin.encode() if stdin is not None else None)
    process = reactor.spawnProcess(collect, args[0], list(args), env=env)
    guard = reactor.callLater(HANG_GUARD, process.signalProcess, "KILL")
    code = await collect.done
    if guard.active():
        guard.cancel()
    else:
        code = None  # killed by the guard: a hang, not an answer
    out = b"".join(collect.out).decode(errors="replace")
    err = b"".join(collect.err).decode(errors="replace")
    if code != 0:
        raise ClientFailed(args, code, out, err)
    return out


def _binary(name: str, package: str, *candidates: str) -> str:
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: apt-get install {package}")
    return found


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"{what} needs root: run the tests as root (CI does)")


def _base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
    }


def _remove(directory: Path) -> None:
    """Remove a client's state; vfs leaves read-only directories, which root removes."""
    if directory.exists():
        shutil.rmtree(directory)


class DockerDaemon:
    """
    Debian's C{dockerd} (package docker.io) with its own data root, exec
    root, pidfile, socket and containerd, no iptables and no bridge, and the
    C{docker} CLI of the same package pointed at it, with a config directory
    of its own for C{docker login}.

    @param insecure: C{insecure-registries} (loopback is insecure by default too).
    @param mirrors: C{registry-mirrors}, used for C{docker.io} names only.
    """

    def __init__(
        self, directory: Path, insecure: Sequence[str] = (), mirrors: Sequence[str] = ()
    ) -> None:
        _require_root("dockerd")
        self.directory = directory
        self.socket = directory / "docker.sock"
        self.data_root = directory / "data"
        self.exec_root = directory / "exec"
        self.config = directory / "daemon.json"
        self.env = {
            **_base_env(directory / "home"),
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(directory / "cli"),
        }
        self.settings = {"insecure-registries": list(insecure), "registry-mirrors": list(mirrors)}
        self.process: Process | None = None
        self.cli = _binary("docker", "docker.io", "/usr/bin/docker")

    def start(self) -> DockerDaemon:
        dockerd = _binary("dockerd", "docker.io", "/usr/sbin/dockerd")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(self.settings))
        self.process = Process(
            [
                dockerd,
                "--config-file",
                str(self.config),
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
                "--data-root",
                str(self.data_root),
                "--exec-root",
                str(self.exec_root),
                "--pidfile",
                str(self.directory / "docker.pid"),
                "--host",
                f"unix://{self.socket}",
            ],
            env=self.env,
            log=self.directory / "dockerd.log",
        )
        try:
            self.process.wait_for(f"API listen on {re.escape(str(self.socket))}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            # dockerd stops the containerd it started (it also dies with dockerd).
            self.process.stop()
            self.process = None
        _remove(self.data_root)
        _remove(self.exec_root)

    async def docker(self, *args: str, stdin: str | None = None) -> str:
        return await run([self.cli, *args], self.env, stdin)

    async def info(self) -> dict:
        return json.loads(await self.docker("info", "--format", "{{json .}}"))

    async def pull(self, reference: str) -> str:
        """Pull; return the digest the daemon recorded for it (C{RepoDigests})."""
        await self.docker("pull", "--quiet", reference)
        return await self.repo_digest(reference)

    async def repo_digest(self, reference: str) -> str:
        digests = json.loads(
            await self.docker("image", "inspect", "--format", "{{json .RepoDigests}}", reference)
        )
        repository = _repository(reference)
        for entry in digests:
            name, _, digest = entry.partition("@")
            if _repository(name) == repository:
                return digest
        raise AssertionError(f"docker has no digest of {repository}: {digests}")

    async def push(self, reference: str) -> str:
        """Push; return the manifest digest Docker reports (Docker may recompress layers)."""
        out = await self.docker("push", reference)
        match = re.search(r"digest: (sha256:[0-9a-f]{64}) size: \d+", out)
        if match is None:
            raise AssertionError(f"docker push {reference} printed no digest:\n{out}")
        return match[1]

    async def tag(self, source: str, target: str) -> None:
        await self.docker("tag", source, target)

    async def login(self, host: str, user: str, password: str) -> str:
        return await self.docker(
            "login", "--username", user, "--password-stdin", host, stdin=password
        )

    async def logout(self, host: str) -> str:
        return await self.docker("logout", host)

    async def remove_all(self) -> None:
        """Remove every image, so that the next pull downloads every layer."""
        ids = (await self.docker("images", "--all", "--quiet")).split()
        if ids:
            await self.docker("image", "rm", "--force", *sorted(set(ids)))
        assert not (await self.docker("images", "--all", "--quiet")).split()


class Podman:
    """
    Debian's podman, rootful, with storage of its own (vfs), file events,
    cgroupfs, its own registries.conf, containers.conf, signature policy and
    auth file.  C{mirror} rewrites registries.conf: podman reads it on every
    command.
    """

    def __init__(self, directory: Path) -> None:
        _require_root("rootful podman")
        self.directory = directory
        self.root = directory / "root"
        self.runroot = directory / "run"
        self.binary = _binary("podman", "podman", "/usr/bin/podman")
        home = directory / "home"
        self.env = _base_env(home)
        self.registries = directory / "registries.conf"
        self.auth_file = directory / "auth.json"
        containers_conf = directory / "containers.conf"
        storage_conf = directory / "storage.conf"
        policy = home / ".config" / "containers" / "policy.json"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        containers_conf.write_text(
            '[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n'
        )
        storage_conf.write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{self.runroot}"\ngraphroot = "{self.root}"\n'
        )
        self.auth_file.write_text("{}")
        self.mirror(None)
        (directory / "tmp").mkdir(exist_ok=True)
        self.env.update(
            {
                "CONTAINERS_REGISTRIES_CONF": str(self.registries),
                "CONTAINERS_CONF": str(containers_conf),
                "CONTAINERS_STORAGE_CONF": str(storage_conf),
                "REGISTRY_AUTH_FILE": str(self.auth_file),
                "XDG_RUNTIME_DIR": str(directory / "tmp"),
            }
        )

    def mirror(self, location: str | None) -> None:
        """Pull docker.io names through C{location} (C{host:port/docker.io}), or not at all."""
        text = "unqualified-search-registries = []\n"
        if location is not None:
            text += (
                '[[registry]]\nprefix = "docker.io"\nlocation = "registry-1.docker.io"\n'
                f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n'
            )
        self.registries.write_text(text)

    def stop(self) -> None:
        _remove(self.root)
        _remove(self.runroot)

    async def podman(self, *args: str, stdin: str | None = None) -> str:
        return await run(
            [
                self.binary,
                "--root",
                str(self.root),
                "--runroot",
                str(self.runroot),
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--tmpdir",
                str(self.directory / "tmp"),
                *args,
            ],
            self.env,
            stdin,
        )

    async def pull(self, reference: str) -> str:
        """Pull over plain HTTP; return the manifest digest podman recorded."""
        tls = [] if reference.startswith("docker.io/") else ["--tls-verify=false"]
        await self.podman("pull", "--quiet", *tls, reference)
        return (await self.podman("image", "inspect", "--format", "{{.Digest}}", reference)).strip()

    async def push(self, source: str, destination: str) -> str:
        digest_file = self.directory / "tmp" / "pushed.digest"
        await self.podman(
            "push", "--tls-verify=false", "--digestfile", str(digest_file), source, destination
        )
        return digest_file.read_text().strip()

    async def login(self, host: str, user: str, password: str) -> str:
        return await self.podman(
            "login", "--tls-verify=false", "--username", user, "--password-stdin", host,
            stdin=password,
        )  # fmt: skip

    async def logout(self, host: str) -> str:
        return await self.podman("logout", host)

    async def remove_all(self) -> None:
        await self.podman("rmi", "--all", "--force")
        assert not (await self.podman("images", "--all", "--quiet")).split()


class Containerd:
    """
    Debian's containerd with a config, root, state and sockets of its own
    (no CRI plugin), driven with C{ctr --address}.  Images are unpacked with
    the native snapshotter, which needs no mounts.
    """

    def __init__(self, directory: Path) -> None:
        _require_root("containerd")
        self.directory = directory
        self.socket = directory / "containerd.sock"
        self.root = directory / "root"
        self.state = directory / "state"
        self.hosts_dir = directory / "certs.d"
        self.env = _base_env(directory / "home")
        self.ctr_binary = _binary("ctr", "containerd", "/usr/bin/ctr")
        self.process: Process | None = None

    def start(self) -> Containerd:
        binary = _binary("containerd", "containerd", "/usr/bin/containerd")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "config.toml"
        config.write_text(
            f"""
version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.directory / "opt"}"
"""
        )
        self.process = Process(
            [binary, "--config", str(config)], env=self.env, log=self.directory / "containerd.log"
        )
        try:
            self.process.wait_for("containerd successfully booted")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        _remove(self.root)
        _remove(self.state)

    async def ctr(self, *args: str) -> str:
        return await run([self.ctr_binary, "--address", str(self.socket), *args], self.env)

    def mirror(self, registry: str, url: str) -> None:
        """A hosts.toml that sends C{registry}'s pulls to C{url} (C{--hosts-dir})."""
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(
            'server = "https://registry-1.docker.io"\n'
            f'[host."{url}"]\n  capabilities = ["pull", "resolve"]\n'
        )

    async def pull(self, reference: str, *options: str) -> str:
        """C{ctr images pull}, unpacked; return the digest containerd recorded."""
        if reference.startswith("docker.io/"):
            options = ("--hosts-dir", str(self.hosts_dir), *options)
        else:
            options = ("--plain-http", *options)
        await self.ctr("images", "pull", "--snapshotter", "native", *options, reference)
        return await self.digest(reference)

    async def digest(self, reference: str) -> str:
        for line in (await self.ctr("images", "ls")).splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                match = _DIGEST.search(line)
                assert match, line
                return match[0]
        raise AssertionError(f"containerd has no image {reference}")

    async def push(self, reference: str, *options: str) -> str:
        await self.ctr("images", "push", "--plain-http", *options, reference)
        return await self.digest(reference)

    async def tag(self, source: str, target: str) -> None:
        await self.ctr("images", "tag", "--force", source, target)

    async def remove_all(self) -> None:
        """Remove every image and, synchronously, the content only they held."""
        names = (await self.ctr("images", "ls", "--quiet")).split()
        if names:
            await self.ctr("images", "rm", "--sync", *names)
        assert not (await self.ctr("content", "ls", "--quiet")).split()


def _repository(reference: str) -> str:
    """
    C{host/name} of a reference, without tag or digest, and in Docker's
    short form for Docker Hub's names (C{library/alpine} is C{alpine}).
    """
    name = reference.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    name = name.removeprefix("docker.io/")
    return name.removeprefix("library/")
