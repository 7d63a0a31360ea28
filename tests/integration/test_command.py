"""
The txregistry command with real parts: doctor against real registries,
prefetch through a real twistd, and the cache commands on its cache.
"""

import hashlib
import io
import os
import re
import subprocess
import sys

import pytest
import pytest_twisted
from harness.network import TableResolver, free_port
from harness.skopeo import check_pulled
from harness.twistd import ROOT, start_in_front_of, write_config
from twisted.internet import reactor

from txregistry.cli.doctor import doctor
from txregistry.config import CacheConfig, Config, MirrorConfig, RegistryConfig
from txregistry.storage.disk import DiskStorage
from txregistry.storage.runner import run_inline

pytestmark = pytest.mark.integration


def cli(*args, cwd=None):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "txregistry", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=300,
    )


@pytest_twisted.ensureDeferred
async def test_doctor_checks_each_mirror_and_concludes(
    upstream, tls_upstream, ca, token_upstream, tmp_path
):
    dead = free_port()
    config = Config(
        cache=CacheConfig(tmp_path),
        registries=(
            # Its name resolves to ::1, where nothing listens, and 127.0.0.1.
            RegistryConfig(
                "docker.io",
                (MirrorConfig(f"http://mirror.test:{upstream.registry.port}"),),
                default=True,
            ),
            RegistryConfig("tls.example", (MirrorConfig(tls_upstream.url),), ca_file=ca.cert_path),
            RegistryConfig("token.example", (MirrorConfig(token_upstream.url),)),
            RegistryConfig("dead.example", (MirrorConfig(f"http://127.0.0.1:{dead}"),)),
        ),
    )
    resolver = TableResolver({"mirror.test": ["::1", "127.0.0.1"]}, reactor.nameResolver)
    out = io.StringIO()
    code = await doctor(reactor, config, out, resolver)
    text = out.getvalue()
    sections = dict((section.split("\n", 1)[0], section) for section in text.split("\n\n")[1:])
    assert code == 1, text
    assert (
        "conclusion: IPv6 resolves but does not connect; txregistry uses IPv4: fine"
        in sections["registry docker.io"]
    )
    assert "conclusion: ok: " in sections["registry tls.example"]
    assert "verified" in sections["registry tls.example"]
    assert "anonymous ok" in sections["registry token.example"]
    assert (
        "conclusion: no mirror reachable: check DNS, firewall or proxy"
        in sections["registry dead.example"]
    )


def test_doctor_command_exits_non_zero_without_a_usable_mirror(tmp_path):
    config = write_config(
        tmp_path,
        f'[[registry]]\nname = "docker.io"\nmirrors = ["http://127.0.0.1:{free_port()}"]\n',
    )
    done = cli("doctor", "--config", str(config))
    assert done.returncode == 1
    assert "conclusion: no mirror reachable" in done.stdout
    assert "Traceback" not in done.stderr


def test_prefetch_warms_the_cache_and_the_cache_commands_see_it(tmp_path, upstream, skopeo):
    process, config, port = start_in_front_of(tmp_path, upstream.url)
    server = f"http://127.0.0.1:{port}"
    try:
        done = cli(
            "prefetch",
            "--server",
            server,
            "small:v1",
            "docker.io/library/multi:v1",
            "--all-platforms",
        )
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith("prefetched docker.io/library/small:v1: 4 blobs")
        assert [line.split(":")[0] for line in lines[1:]] == [
            "prefetched docker.io/library/multi"
        ] * 2
        assert "(linux/amd64)" in lines[1] and "(linux/arm64)" in lines[2]

        missing = cli("prefetch", "--server", server, "nope:1")
        assert missing.returncode == 1
        assert "txregistry prefetch: nope:1: HTTP 404: MANIFEST_UNKNOWN" in missing.stdout

        # A pull after the prefetch downloads nothing from upstream.
        mark = upstream.registry.mark()
        skopeo.pull_now(f"127.0.0.1:{port}/library/small:v1", tmp_path / "pulled")
        check_pulled(tmp_path / "pulled", upstream.images["small"].digest)
        assert upstream.registry.blob_gets(mark) == []

        stats = cli("cache", "stats", "--config", str(config))
        assert stats.returncode == 0, stats.stderr
        assert "12 blobs" in stats.stdout, stats.stdout
        assert "hit ratio" in stats.stdout
    finally:
        process.stop()

    # The service keeps its answer counts when it stops, and they are what
    # its access log says: the 404 for nope:1 is neither a hit nor a miss.
    access = [line for line in process.lines if "txregistry.access" in line]
    served = [line for line in access if re.search(r'/(manifests|blobs)/\S+" 200 ', line)]
    expected_hits = sum(" 200 HIT " in line for line in served)
    expected_misses = sum(" 200 MISS " in line for line in served)
    assert expected_hits and expected_misses and any('" 404 ' in line for line in access)
    stats = cli("cache", "stats", "--config", str(config))
    assert f"({expected_hits} hits, {expected_misses} misses)" in stats.stdout, stats.stdout

    # Corrupt one blob on disk, keeping its size: verify finds and drops it.
    files = {
        f"blob/sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}": path
        for path in (tmp_path / "cache" / "store").rglob("*.val")
    }
    storage = DiskStorage(tmp_path / "cache", 1 << 30, run_inline)
    storage.open(exclusive=False)
    stored = {f"blob/{name}" for name in storage.entries("blob").result}
    storage.close()
    victim_key = min(stored & set(files))
    path = files[victim_key]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    verify = cli("cache", "verify", "--config", str(config))
    assert verify.returncode == 0
    assert f"removed corrupt entry {victim_key}" in verify.stdout
    assert "1 corrupt, removed" in verify.stdout

    small = write_config(
        tmp_path,
        config.read_text().replace("[cache]", '[cache]\nsize_limit = "100KiB"'),
    )
    gc = cli("cache", "gc", "--config", str(small))
    assert gc.returncode == 0 and gc.stdout.startswith("evicted ")
    assert int(gc.stdout.split()[1]) > 0


def test_config_check(tmp_path):
    good = write_config(tmp_path, '[cache]\nsize_limit = "1GiB"\n')
    done = cli("config", "check", str(good))
    assert done.returncode == 0 and done.stdout.startswith(f"{good}: OK")
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["ssl:5443:privateKey=/nonexistent.pem"]\n')
    done = cli("config", "check", str(bad))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"txregistry: config error: {bad}: server.listen[0]: cannot read /nonexistent.pem:"
        " No such file or directory"
    )
