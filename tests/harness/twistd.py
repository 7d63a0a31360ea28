"""Starting the real C{twistd txregistry} command, as users run it."""

from __future__ import annotations

import os
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
