"""Driving skopeo: pushing test images upstream, pulling them through txregistry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue


def skopeo_binary() -> str:
    path = shutil.which("skopeo")
    if path is None:
        raise RuntimeError("skopeo is not installed: apt-get install skopeo")
    return path


class Skopeo:
    """skopeo with a home of its own and a policy that accepts anything."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.policy = home / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        self.env = {
            "HOME": str(home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TMPDIR": str(home),
            "XDG_RUNTIME_DIR": str(home),
        }

    def _args(self, args: tuple[str, ...]) -> list[str]:
        return ["--policy", str(self.policy), "--tmpdir", str(self.home), *args]

    def run(self, *args: str) -> str:
        """Run skopeo synchronously: for fixtures, while nothing in-process must answer."""
        done = subprocess.run(
            [skopeo_binary(), *self._args(args)], env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise AssertionError(f"skopeo {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    async def run_async(self, *args: str) -> str:
        """Run skopeo while the reactor keeps serving, as txregistry runs in-process."""
        out, err, code = await getProcessOutputAndValue(
            skopeo_binary(), self._args(args), env=self.env
        )
        if code != 0:
            raise AssertionError(f"skopeo {' '.join(args)} failed ({code}):\n{err.decode()}")
        return out.decode()

    @staticmethod
    def _pull_args(reference: str, destination: Path, options: tuple[str, ...]) -> list[str]:
        return [
            "copy",
            "--src-tls-verify=false",
            "--preserve-digests",
            *options,
            f"docker://{reference}",
            f"dir:{destination}",
        ]

    async def pull(self, reference: str, destination: Path, *options: str) -> Path:
        """
        Copy an image into a C{dir:} directory, keeping manifests byte for
        byte, through an HTTP registry (txregistry on loopback).
        """
        await self.run_async(*self._pull_args(reference, destination, options))
        return destination

    def pull_now(self, reference: str, destination: Path, *options: str) -> Path:
        """L{pull}, synchronously: for a txregistry in a process of its own."""
        self.run(*self._pull_args(reference, destination, options))
        return destination


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def check_pulled(directory: Path, digest: str) -> list[str]:
    """
    Check a C{dir:} copy: its manifest has the digest that was pushed, and
    every blob file's content matches its name.  Returns the blob digests.
    """
    assert sha256_file(directory / "manifest.json") == digest
    blobs = []
    for path in directory.iterdir():
        if path.name in ("manifest.json", "version") or path.name.endswith(".manifest.json"):
            continue
        expected = "sha256:" + path.name
        assert sha256_file(path) == expected, f"{path.name} does not match its digest"
        blobs.append(expected)
    return blobs
