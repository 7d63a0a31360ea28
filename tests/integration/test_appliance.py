"""
txregistry as an appliance, with real processes: TLS termination with a
chain and a certificate reload, the systemd unit's command reporting
readiness, graceful stops, JSON logs and metrics.
"""

import json
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request

import pytest
import pytest_twisted
import treq
from harness.faults import Fault
from harness.processes import Process
from harness.skopeo import check_pulled
from harness.twistd import ROOT, TWISTD, start, start_in_front_of, write_config
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

UNIT = ROOT / "systemd" / "txregistry.service"


@pytest.fixture
def tls_files(tmp_path, ca):
    """A certificate for localhost from an intermediate CA, as files a listener reads."""
    intermediate = ca.intermediate("txregistry test intermediate")
    credential = intermediate.issue("first")
    files = tmp_path / "tls"
    files.mkdir()
    for name, source in (
        ("cert.pem", credential.cert),
        ("key.pem", credential.key),
        ("chain.pem", intermediate.cert_path),
    ):
        shutil.copy(source, files / name)
    return files, intermediate


def tls_config(tmp_path, upstream, files):
    return write_config(
        tmp_path,
        f"""
        [server]
        listen = [
            "tcp:0:interface=127.0.0.1",
            "ssl:0:privateKey={files}/key.pem:certKey={files}/cert.pem:extraCertChain={files}/chain.pem:interface=127.0.0.1",
        ]
        admin_listen = []
        [cache]
        directory = "{tmp_path / "cache"}"
        [[registry]]
        name = "docker.io"
        mirrors = ["{upstream.url}"]
        """,
    )


def tls_port(process):
    return int(process.wait_for(r"listening on ssl:0:\S+ \(127\.0\.0\.1:(\d+)\)")[1])


def s_client(port, *options, ca=None):
    command = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        *options,
    ]
    if ca is not None:
        command += ["-CAfile", str(ca)]
    return subprocess.run(command, input="", capture_output=True, text=True, timeout=60)


def test_tls_listener_serves_pulls_and_refuses_old_tls(tmp_path, upstream, tls_files, ca, skopeo):
    files, _ = tls_files
    process, _, _ = start(tmp_path, tls_config(tmp_path, upstream, files))
    try:
        port = tls_port(process)
        # skopeo trusts only the root: the listener must send its chain.
        trust = tmp_path / "trust"
        trust.mkdir()
        shutil.copy(ca.cert_path, trust / "ca.crt")
        image = upstream.images["small"]
        skopeo.run(
            "copy",
            "--src-cert-dir",
            str(trust),
            "--preserve-digests",
            f"docker://localhost:{port}/library/small:v1",
            f"dir:{tmp_path / 'pulled'}",
        )
        check_pulled(tmp_path / "pulled", image.digest)

        modern = s_client(port, "-tls1_2", ca=ca.cert_path)
        assert modern.returncode == 0 and "Verify return code: 0 (ok)" in modern.stdout
        # The client is let down to TLS 1.1; the server must refuse it.
        old = s_client(port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        assert old.returncode != 0
        assert "alert protocol version" in old.stderr + old.stdout
    finally:
        process.stop()


def peer_name(port, ca):
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as connection:
            return dict(x[0] for x in connection.getpeercert()["subject"])["commonName"]


def get_over(connection):
    connection.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = b""
    while b"\r\n\r\n{}" not in answer:
        chunk = connection.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def test_sighup_reloads_the_certificate_without_dropping_connections(
    tmp_path, upstream, tls_files, ca
):
    files, intermediate = tls_files
    process, _, _ = start(tmp_path, tls_config(tmp_path, upstream, files))
    try:
        port = tls_port(process)
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        kept = context.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
        )
        kept.settimeout(60)  # a hang guard
        assert get_over(kept).startswith(b"HTTP/1.1 200")
        assert peer_name(port, ca.cert_path) == "first"

        second = intermediate.issue("second")
        shutil.copy(second.cert, files / "cert.pem")
        shutil.copy(second.key, files / "key.pem")
        mark = len(process.lines)
        process.signal(signal.SIGHUP)
        process.wait_for("reloaded TLS certificate .*: second, valid until", mark)

        assert peer_name(port, ca.cert_path) == "second"
        assert get_over(kept).startswith(b"HTTP/1.1 200"), "the open connection was kept"
        kept.close()
    finally:
        process.stop()


def unit_exec_start():
    """The unit's ExecStart, as a list of arguments."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line[len("ExecStart=") :])
    raise AssertionError("no ExecStart in the unit")


def test_unit_command_reports_ready_only_once_it_can_pull(tmp_path, upstream):
    command = unit_exec_start()
    assert command[0] == "/opt/txregistry/bin/twistd"
    assert command[command.index("--config") + 1] == "/etc/txregistry/txregistry.toml"
    config = write_config(
        tmp_path,
        f"""
        [server]
        listen = ["tcp:0:interface=127.0.0.1"]
        admin_listen = []
        [cache]
        directory = "{tmp_path / "cache"}"
        [[registry]]
        name = "docker.io"
        mirrors = ["{upstream.url}"]
        """,
    )
    # The unit's command, with this checkout's twistd and a test config.
    command[0] = TWISTD
    command[command.index("--config") + 1] = str(config)

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)  # a hang guard, not a measurement
    process = Process(
        command,
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "NOTIFY_SOCKET": str(tmp_path / "notify"),
        },
    )
    try:
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving on 127.0.0.1:")
        port = int(ready.rsplit(":", 1)[1])
        # At the moment systemd hears READY=1, the registry answers.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/") as response:
            assert (response.status, response.read()) == (200, b"{}")
        process.wait_for("txregistry ready")
        process.signal(signal.SIGTERM)
        assert notify.recv(4096).decode().startswith("STOPPING=1")
        assert process.wait_exit() == -signal.SIGTERM
    finally:
        process.stop()
        notify.close()


@pytest_twisted.ensureDeferred
async def test_stop_lets_a_download_in_progress_finish(tmp_path, upstream, blob, proxy):
    digest, data = blob
    proxy.inject(Fault(f"/blobs/{digest}", "trickle", chunk=256 * 1024, interval=0.02))
    process, config, port = start_in_front_of(tmp_path, proxy.url)
    url = f"http://127.0.0.1:{port}/v2/library/faults/blobs/{digest}"
    download = treq.get(url)
    await process.expect(f"fetching blob library/faults@{digest}")
    process.signal(signal.SIGTERM)
    response = await download
    assert await response.content() == data, "the client got the whole blob"
    assert process.wait_exit() == -signal.SIGTERM
    assert any("waiting up to 30.0s for 1 downloads in progress" in line for line in process.lines)

    again, _, port = start(tmp_path, config)
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/v2/library/faults/blobs/{digest}"
        ) as cached:
            assert cached.headers["X-Cache"] == "HIT" and cached.read() == data
    finally:
        again.stop()


@pytest_twisted.ensureDeferred
async def test_stop_drops_a_stuck_download_cleanly(tmp_path, upstream, blob, proxy):
    digest, _ = blob
    proxy.inject(Fault(f"/blobs/{digest}", "stall", at=500_000))
    process, config, port = start_in_front_of(tmp_path, proxy.url, server='shutdown_timeout = "1s"')
    download = treq.get(
        f"http://127.0.0.1:{port}/v2/library/faults/blobs/{digest}", unbuffered=True
    )
    download.addErrback(lambda _: None)
    await process.expect(f"fetching blob library/faults@{digest}")
    process.signal(signal.SIGTERM)
    assert process.wait_exit() == -signal.SIGTERM
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    again, _, port = start(tmp_path, config)
    try:
        assert not any("unclean stop" in line for line in again.lines)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
        assert health["cache"]["status"] == "ok"
    finally:
        again.stop()


def test_json_logs_and_metrics(tmp_path, upstream, skopeo):
    config = write_config(
        tmp_path,
        f"""
        [server]
        listen = ["tcp:0:interface=127.0.0.1"]
        admin_listen = []
        [log]
        format = "json"
        [cache]
        directory = "{tmp_path / "cache"}"
        [[registry]]
        name = "docker.io"
        mirrors = ["{upstream.url}"]
        """,
    )
    process = Process(
        [TWISTD, "-n", "--pidfile=", "txregistry", "--config", str(config)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    try:
        match = process.wait_for(
            r'"message": "listening on tcp:0:interface=127.0.0.1 \(127.0.0.1:(\d+)\)"'
        )
        port = int(match[1])
        process.wait_for('"message": "txregistry ready"')
        skopeo.run(
            "copy",
            "--src-tls-verify=false",
            f"docker://127.0.0.1:{port}/library/small:v1",
            f"dir:{tmp_path / 'pulled'}",
        )
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        process.stop()
    records = [json.loads(line) for line in process.lines if line.startswith("{")]
    assert records and len(records) == len([line for line in process.lines if line.strip()])
    access = [r for r in records if r["namespace"] == "txregistry.access"]
    blobs = [r for r in access if "/blobs/" in r["path"]]
    assert len(blobs) == 4 and {r["cache"] for r in blobs} == {"MISS"}
    assert all(r["status"] == 200 and r["sent"] > 0 and r["method"] == "GET" for r in blobs)

    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert (
        found[
            ("txregistry_requests_total", (("cache", "miss"), ("kind", "blob"), ("status", "200")))
        ]
        == 4
    )
    mirror = (("mirror", upstream.url), ("registry", "docker.io"))
    assert found[("txregistry_upstream_requests_total", mirror)] >= 5


def readme_block(after: str) -> str:
    """The first code block of the README after the line containing C{after}."""
    readme = (ROOT / "README.md").read_text()
    rest = readme[readme.index(after) :]
    start = rest.index("```ini\n") + len("```ini\n")
    return rest[start : rest.index("```", start)]


@pytest.mark.parametrize(
    "heading, unit, expected",
    [
        (
            "make vappd start after txregistry",
            "vappd.service",
            ["Wants=txregistry.service", "After=txregistry.service"],
        ),
        (
            "give it `CAP_NET_BIND_SERVICE`",
            "txregistry.service",
            ["AmbientCapabilities=CAP_NET_BIND_SERVICE"],
        ),
    ],
)
def test_readme_drop_ins_verify(tmp_path, heading, unit, expected):
    """The README's drop-ins are valid systemd, and say what the README says they do."""
    drop_in = readme_block(heading)
    for line in expected:
        assert line in drop_in.splitlines()
    if unit == "txregistry.service":
        text = UNIT.read_text().replace("/opt/txregistry/bin/twistd", "/bin/true")
        text = text.replace("User=txregistry", "User=root").replace(
            "Group=txregistry", "Group=root"
        )
    else:
        text = "[Unit]\nDescription=stands in for vappd\n[Service]\nExecStart=/bin/true\n"
    (tmp_path / unit).write_text(text)
    (tmp_path / f"{unit}.d").mkdir()
    (tmp_path / f"{unit}.d" / "txregistry.conf").write_text(drop_in)
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
