"""Starting the real C{twistd txregistry} command, as users run it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness.processes import Process

ROOT = Path(__file__).parents[2]
# The twistd script installed next to this Python.
TWISTD = str(Path(sys.executable).parent / "twistd")


def twistd(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Process:
    """Start C{twistd -n txregistry ARGS}, finding the plugin in this checkout."""
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path),
        **(env or {}),
    }
    return Process([TWISTD, "-n", "--pidfile=", "txregistry", *args], cwd=tmp_path, env=environment)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "txregistry.toml"
    path.write_text(text)
    return path


def start_in_front_of(tmp_path: Path, upstream_url: str) -> tuple[Process, Path, int]:
    """
    Start txregistry on a free loopback port, caching docker.io from
    C{upstream_url}; return the process, its config file and its port once
    it is ready.
    """
    config = write_config(
        tmp_path,
        f"""
        [server]
        listen = ["tcp:0:interface=127.0.0.1"]
        admin_listen = ["tcp:0:interface=127.0.0.1"]
        [cache]
        directory = "{tmp_path / "cache"}"
        [[registry]]
        name = "docker.io"
        mirrors = ["{upstream_url}"]
        """,
    )
    process = twistd(tmp_path, "--config", str(config))
    port = int(
        process.wait_for(r"listening on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)")[1]
    )
    process.wait_for("txregistry ready")
    return process, config, port
