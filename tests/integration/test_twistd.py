"""
The real command: C{twistd -n txregistry}, found as a plugin, started with a
config file, pulled through, and stopped; and the one-line refusals of bad
configs.
"""

import signal
import socket

import pytest
from harness.skopeo import check_pulled
from harness.twistd import start_in_front_of, twistd, write_config
from twisted.copyright import version as twisted_version

from txregistry import __version__

pytestmark = pytest.mark.integration


def test_twistd_serves_pulls_from_a_config_file(tmp_path, upstream, skopeo):
    process, config, port = start_in_front_of(tmp_path, upstream.url)
    try:
        process.wait_for(f"starting with config file {config}")
        image = upstream.images["small"]
        skopeo.pull_now(f"127.0.0.1:{port}/library/small:v1", tmp_path / "pulled")
        check_pulled(tmp_path / "pulled", image.digest)
    finally:
        process.signal(signal.SIGTERM)
    assert_clean_stop(process)
    # Twisted's factories, the pool's for each upstream connection and the
    # listeners', are not announced: the "listening on" lines say it.
    assert not any(
        "Starting factory" in line or "Stopping factory" in line for line in process.lines
    )


def test_builtin_defaults_listen_on_loopback_5050(tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5050)) == 0:
            pytest.skip("something already listens on 127.0.0.1:5050")
    process = twistd(tmp_path, env={"CACHE_DIRECTORY": str(tmp_path / "cache")})
    try:
        process.wait_for("starting with built-in defaults")
        process.wait_for(r"registry docker\.io \(default\): mirrors https://registry-1\.docker\.io")
        process.wait_for(r"listening on tcp:5050:interface=127\.0\.0\.1 \(127\.0\.0\.1:5050\)")
        process.wait_for(f"cache open in {tmp_path / 'cache'}")
        process.wait_for("txregistry ready")
    finally:
        process.signal(signal.SIGTERM)
    assert_clean_stop(process)


def assert_clean_stop(process):
    # twistd shuts down, then ends by the signal it was sent, which systemd
    # counts as a clean stop.
    assert process.wait_exit() == -signal.SIGTERM
    assert any("Server Shut Down." in line for line in process.lines)
    assert not any("Traceback" in line for line in process.lines)


def test_version_and_help_name_txregistrys_version(tmp_path):
    version = twistd(tmp_path, "--version")
    assert version.wait_exit() == 0
    assert version.lines == [f"txregistry {__version__} (Twisted {twisted_version})"]
    help = twistd(tmp_path, "--help")
    assert help.wait_exit() == 0
    assert any("--version  Display txregistry's version and exit." in line for line in help.lines)
    assert not any("Twisted version" in line for line in help.lines)


def refusal(tmp_path, *args):
    """Run twistd expecting it to refuse to start; return its one line."""
    process = twistd(tmp_path, *args)
    code = process.wait_exit()
    assert code != 0
    assert not any("Traceback" in line for line in process.lines), process.lines
    assert len(process.lines) == 1, process.lines
    return process.lines[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[cache]\nsize_limt = '1GiB'\n", "cache.size_limt: unknown key"),
        ("[cache]\ntag_ttl = 'forever'\n", "cache.tag_ttl: 'forever' is not a duration"),
        (
            "[server]\nlisten = ['tcp:50x50']\n",
            "server.listen[0]: 'tcp:50x50': port '50x50' is not a port number (0 to 65535): "
            "use tcp:PORT:interface=ADDRESS",
        ),
        ("this is not toml\n", "not valid TOML"),
    ],
)
def test_bad_config_stops_startup_with_one_line(tmp_path, text, message):
    config = write_config(tmp_path, text)
    line = refusal(tmp_path, "--config", str(config))
    assert line.startswith("txregistry: config error: ")
    assert str(config) in line and message in line


def test_password_file_readable_by_others_stops_startup(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    config = write_config(
        tmp_path,
        f'[[registry]]\nname = "docker.io"\nmirrors = ["https://registry-1.docker.io"]\n'
        f'username = "alice"\npassword_file = "{secret}"\n',
    )
    line = refusal(tmp_path, "--config", str(config))
    assert "registry[0].password_file" in line and "chmod 600" in line
    assert "hunter2" not in line


def test_unreadable_config(tmp_path):
    line = refusal(tmp_path, "--config", str(tmp_path / "missing.toml"))
    assert "missing.toml: cannot read config file: No such file or directory" in line


def test_port_in_use(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(
            tmp_path,
            f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
            f'[cache]\ndirectory = "{tmp_path / "cache"}"\n',
        )
        process = twistd(tmp_path, "--config", str(config))
        assert process.wait_exit() != 0
    assert not any("Traceback" in line for line in process.lines), process.lines
    (line,) = [line for line in process.lines if "cannot listen" in line]
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in line
    assert "Address already in use" in line
