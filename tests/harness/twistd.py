"""Starting the real C{twistd txregistry} command, as users run it."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from harness.processes import Process

ROOT = Path(__file__).parents[2]
# The twistd script installed next to this Python.
TWISTD = str(Path(sys.executable).parent / "twistd")


def twistd(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> Process:
    """Start C{twistd -n txregistry ARGS}, finding the plugin in this checkout."""
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path),
        **(env or {}),
    }
    return Process(
        [TWISTD, "-n", "--pidfile=", "txregistry", *args],
        cwd=tmp_path,
        env=environment,
        preexec=preexec,
    )


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "txregistry.toml"
    path.write_text(text)
    return path


def start_in_front_of(
    tmp_path: Path,
    upstream_url: str,
    server: str = "",
    preexec: Callable[[], None] | None = None,
) -> tuple[Process, Path, int]:
    """
    Start txregistry on a free loopback port, caching docker.io from
    C{upstream_url}; return the process, its config file and its port once
    it is ready.  C{server} adds lines to the C{[server]} table.
    """
    config = write_config(
        tmp_path,
        f"""
        [server]
        listen = ["tcp:0:interface=127.0.0.1"]
        admin_listen = ["tcp:0:interface=127.0.0.1"]
        {server}
        [cache]
        directory = "{tmp_path / "cache"}"
        [[registry]]
        name = "docker.io"
        mirrors = ["{upstream_url}"]
        """,
    )
    return start(tmp_path, config, preexec)


def start(
    tmp_path: Path, config: Path, preexec: Callable[[], None] | None = None
) -> tuple[Process, Path, int]:
    """Start twistd with a config file; wait until it is ready."""
    process = twistd(tmp_path, "--config", str(config), preexec=preexec)
    # The registry's listener is logged before the admin one.
    port = int(
        process.wait_for(r"listening on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)")[1]
    )
    process.wait_for("txregistry ready")
    return process, config, port


def free_port() -> int:
    """A loopback port nothing listens on now, for a node whose URL its peers must know."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_node(
    directory: Path, port: int, upstream_url: str, self_url: str, peers: list[str], extra: str = ""
) -> Process:
    """
    Start one fleet node on C{port}, with a local cache of its own in
    C{directory}, caching docker.io from C{upstream_url}; wait until it is
    ready.
    """
    directory.mkdir(parents=True, exist_ok=True)
    peer_list = ", ".join(f'"{peer}"' for peer in peers)
    config = write_config(
        directory,
        f"""
        [server]
        listen = ["tcp:{port}:interface=127.0.0.1"]
        admin_listen = []
        [cache]
        directory = "{directory / "cache"}"
        {extra}
        [[registry]]
        name = "docker.io"
        mirrors = ["{upstream_url}"]
        [fleet]
        self = "{self_url}"
        peers = [{peer_list}]
        """,
    )
    process = twistd(directory, "--config", str(config))
    process.wait_for("txregistry ready")
    return process
