"""
The clients a benchmark measures with: curl for blobs, wrk for request
rates, skopeo for whole images.  Each is a process of its own, so the
bench's Python never stands between a server and its client.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.skopeo import Skopeo

HANG_GUARD = 600.0

MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json,"
    " application/vnd.docker.distribution.manifest.v2+json"
)


def _curl(url: str, accept: str | None = None) -> list[str]:
    headers = ["--header", f"Accept: {accept}"] if accept else []
    return ["curl", "--silent", "--show-error", "--fail", "--output", "/dev/null",
            "--write-out", "%{size_download} %{time_total}\n", *headers, url]  # fmt: skip


@dataclass(frozen=True)
class Fetched:
    size: int
    seconds: float


def fetch(url: str, accept: str | None = None) -> Fetched:
    """One GET with curl, timed by curl from connecting to the last byte."""
    done = subprocess.run(_curl(url, accept), capture_output=True, text=True, timeout=HANG_GUARD)
    if done.returncode != 0:
        raise RuntimeError(f"curl {url}: {done.stderr.strip()}")
    size, seconds = done.stdout.split()
    return Fetched(int(size), float(seconds))


@dataclass(frozen=True)
class FannedOut:
    seconds: float
    # How many of the clients did not get the whole body.
    incomplete: int


def fan_out_counted(url: str, clients: int, size: int) -> FannedOut:
    """
    Like L{fan_out}, but a client that fails or gets fewer than C{size}
    bytes is counted rather than stopping the bench: for the peer, whose
    transfers do not always complete.
    """
    started = time.perf_counter()
    processes = [
        subprocess.Popen(_curl(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(clients)
    ]
    outputs = [process.communicate(timeout=HANG_GUARD) for process in processes]
    elapsed = time.perf_counter() - started
    incomplete = sum(
        1
        for process, (out, _) in zip(processes, outputs, strict=True)
        if process.returncode != 0 or not out.split() or int(out.split()[0]) != size
    )
    return FannedOut(elapsed, incomplete)


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time a process has used so far (robust to a busy machine)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dd_write(source: Path, destination: Path) -> float:
    """
    The seconds C{dd} takes to copy C{source} (in the page cache) to a new
    file, as dd reports them: a cache's own write of a blob, without fsync.
    """
    done = subprocess.run(
        ["dd", f"if={source}", f"of={destination}", "bs=1M"],
        capture_output=True, text=True, timeout=HANG_GUARD,
    )  # fmt: skip
    destination.unlink(missing_ok=True)
    match = re.search(r"copied, ([\d.]+) s", done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"dd {source}: {done.stderr.strip()}")
    return float(match[1])


def fan_out(url: str, clients: int) -> float:
    """
    C{clients} curls started together on the same URL; the seconds from
    starting the first to the end of the last.  Every one must get the
    whole body, of the same size.
    """
    return fan_out_over([url] * clients)


def fan_out_over(urls: list[str]) -> float:
    """One curl per URL, started together (the same blob at several servers): as L{fan_out}."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(_curl(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for url in urls
    ]
    outputs = [process.communicate(timeout=HANG_GUARD) for process in processes]
    elapsed = time.perf_counter() - started
    sizes = set()
    for url, process, (out, err) in zip(urls, processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"curl {url}: {err.strip()}")
        sizes.add(out.split()[0])
    if len(sizes) != 1:
        raise RuntimeError(f"{urls[0]}: clients got different sizes {sorted(sizes)}")
    return elapsed


@dataclass(frozen=True)
class Rate:
    requests_per_second: float
    p99_ms: float


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, connections: int, seconds: float, accept: str = MANIFEST_ACCEPT) -> Rate:
    """wrk at C{connections} connections; the request rate and the 99th percentile latency."""
    done = subprocess.run(
        ["wrk", "--threads", "2", "--connections", str(connections),
         "--duration", f"{seconds:g}s", "--latency", "--header", f"Accept: {accept}", url],
        capture_output=True, text=True, timeout=HANG_GUARD + seconds,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"wrk {url}: {done.stderr.strip()}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if errors:
        raise RuntimeError(f"wrk {url}: {errors[1]} error responses:\n{done.stdout}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", done.stdout, re.MULTILINE)
    if rate is None or p99 is None:
        raise RuntimeError(f"wrk {url}: unexpected output:\n{done.stdout}")
    return Rate(float(rate[1]), float(p99[1]) * _UNITS_MS[p99[2]])


def skopeo_copy(skopeo: Skopeo, reference: str, destination: Path) -> float:
    """The seconds a whole-image C{skopeo copy} to a directory takes."""
    shutil.rmtree(destination, ignore_errors=True)
    started = time.perf_counter()
    skopeo.run("copy", "--src-tls-verify=false", f"docker://{reference}", f"dir:{destination}")
    elapsed = time.perf_counter() - started
    shutil.rmtree(destination)
    return elapsed


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def added_rss(pid: int, during: Callable[[], object]) -> int:
    """
    How many bytes a process's peak resident set grew above its resident
    set while C{during} ran: the kernel's high-water mark (VmHWM), reset
    first through /proc/PID/clear_refs.
    """
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib(pid, "VmRSS")
    during()
    return max(0, _status_kib(pid, "VmHWM") - before) * 1024
