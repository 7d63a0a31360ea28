"""
Real skopeo pushing to a hosted registry of the real C{twistd txregistry},
then pulling back by tag and by digest, across a restart; and with
C{push_users_file}, the credentials skopeo is given.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from harness.images import big_image, small_image, write_layout
from harness.skopeo import Skopeo, check_pulled
from harness.twistd import ROOT, start, write_config

pytestmark = pytest.mark.integration


def hosted_config(tmp_path: Path, server: str = "") -> Path:
    return write_config(
        tmp_path,
        f"""
        [server]
        listen = ["tcp:0:interface=127.0.0.1"]
        admin_listen = []
        {server}
        [cache]
        directory = "{tmp_path / "cache"}"
        size_limit = "1MiB"
        [[registry]]
        name = "local"
        hosted = true
        """,
    )


def push(skopeo: Skopeo, layout: Path, destination: str, *options: str) -> str:
    digest_file = layout.parent / (layout.name + ".digest")
    skopeo.run(
        "copy",
        "--dest-tls-verify=false",
        "--digestfile",
        str(digest_file),
        *options,
        f"oci:{layout}:t",
        f"docker://{destination}",
    )
    return digest_file.read_text().strip()


def stop(process) -> None:
    process.signal(signal.SIGTERM)
    process.wait_exit()
    assert not any("Traceback" in line for line in process.lines)


def test_skopeo_pushes_and_pulls_back_by_tag_and_digest(tmp_path, skopeo):
    layout = tmp_path / "layout"
    # Bigger than size_limit: pushed content is pinned, never evicted.
    write_layout(layout, "t", [big_image(3 << 20, seed=7)])
    process, config, port = start(tmp_path, hosted_config(tmp_path))
    try:
        digest = push(skopeo, layout, f"127.0.0.1:{port}/local/team/app:1")
        process.wait_for(r"stored pushed manifest sha256:\w+ in local/team/app as tag 1")
        for n, reference in enumerate(("team/app:1", f"team/app@{digest}")):
            pulled = skopeo.pull_now(f"127.0.0.1:{port}/local/{reference}", tmp_path / f"p{n}")
            check_pulled(pulled, digest)
        # skopeo's blob-info cache remembers the blobs: a second repository
        # mounts them rather than uploading them again.
        push(skopeo, layout, f"127.0.0.1:{port}/local/other:1")
        mounts = [line for line in process.lines if "mount=" in line and '" 201 ' in line]
        assert mounts, "\n".join(line for line in process.lines if "local/other" in line)
        stats = command("cache", "stats", "--config", str(config))
        pinned = re.search(r"pinned +([\d.]+) MiB", stats)
        assert pinned is not None and float(pinned[1]) >= 3.0, stats
    finally:
        stop(process)
    # It survives a restart, and is served with no upstream at all.
    process, _, port = start(tmp_path, config)
    try:
        pulled = skopeo.pull_now(f"127.0.0.1:{port}/local/team/app:1", tmp_path / "after")
        check_pulled(pulled, digest)
        # Deleted from one repository, the image is still the other's.
        delete(port, f"/v2/local/team/app/manifests/{digest}")
        gc = command("cache", "gc", "--config", str(config), "--grace", "1ms")
        assert "removed 0 manifests and 0 blobs" in gc, gc
        delete(port, f"/v2/local/other/manifests/{digest}")
        gc = command("cache", "gc", "--config", str(config), "--grace", "1ms")
        assert "removed 1 manifests and 2 blobs" in gc, gc
        missing = subprocess.run(
            [
                *skopeo_copy(skopeo),
                f"docker://127.0.0.1:{port}/local/other:1",
                f"dir:{tmp_path / 'gone'}",
            ],
            capture_output=True,
            text=True,
        )
        assert missing.returncode != 0 and "manifest unknown" in missing.stderr.lower()
    finally:
        stop(process)


def command(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "txregistry", *args],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]},
    ).stdout


def delete(port: int, path: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="DELETE")
    assert urllib.request.urlopen(request).status == 202


def skopeo_copy(skopeo: Skopeo) -> list[str]:
    return [
        "skopeo",
        "--policy",
        str(skopeo.policy),
        "copy",
        "--src-tls-verify=false",
    ]


def test_push_users_file_needs_credentials_and_pulls_stay_anonymous(tmp_path, skopeo):
    users = tmp_path / "push.htpasswd"
    subprocess.run(
        ["htpasswd", "-B", "-b", "-c", str(users), "ci", "s3cret-pw"],
        check=True,
        capture_output=True,
    )
    users.chmod(0o600)
    config = hosted_config(tmp_path, f'push_users_file = "{users}"')
    layout = tmp_path / "layout"
    write_layout(layout, "t", [small_image(21)])
    process, _, port = start(tmp_path, config)
    try:
        with pytest.raises(AssertionError, match=r"(?i)unauthorized|authentication required"):
            push(skopeo, layout, f"127.0.0.1:{port}/local/app:1")
        with pytest.raises(AssertionError, match=r"(?i)unauthorized|authentication required"):
            push(skopeo, layout, f"127.0.0.1:{port}/local/app:1", "--dest-creds", "ci:n0t-the-pw")
        digest = push(
            skopeo, layout, f"127.0.0.1:{port}/local/app:1", "--dest-creds", "ci:s3cret-pw"
        )
        pulled = skopeo.pull_now(f"127.0.0.1:{port}/local/app@{digest}", tmp_path / "pulled")
        check_pulled(pulled, digest)
        with pytest.raises(urllib.error.HTTPError) as ping:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/")
        assert ping.value.code == 401
        assert ping.value.headers["WWW-Authenticate"].startswith("Bearer realm=")
    finally:
        stop(process)
    assert not any("s3cret-pw" in line or "n0t-the-pw" in line for line in process.lines)
