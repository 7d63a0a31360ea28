"""
The bench's table: medians of the samples, the ratios the targets are
stated in, and whether each target was met.

Every figure in the table comes from one run of the bench.  Counts of
upstream GETs and added memory take the worst run rather than the median:
a single duplicate download or a single spike is what the target is about.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.scenarios import MiB, Samples, Sizes

BEGIN = "<!-- bench:begin (written by bench/run; edits in here are overwritten) -->"
END = "<!-- bench:end -->"


@dataclass(frozen=True)
class Target:
    at_most: bool
    bound: float

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound

    def __str__(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}"


@dataclass(frozen=True)
class Line:
    scenario: str
    label: str
    value: float
    unit: str
    target: Target | None = None

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def shown(self) -> str:
        precision = {"s": 3, "MB/s": 0, "x": 2, "req/s": 0, "ms": 2, "MiB": 1, "GETs": 0}
        return f"{self.value:.{precision[self.unit]}f} {self.unit}"


def _median(samples: Samples, key: str) -> float:
    return statistics.median(samples[key])


def lines(samples: Samples, sizes: Sizes) -> list[Line]:
    """Every figure of the table, in order."""
    m = lambda key: _median(samples, key)  # noqa: E731
    worst = lambda key: max(samples[key])  # noqa: E731
    out: list[Line] = []

    s = f"1. Cold, one client, {sizes.blob // MiB} MiB blob"
    out += [
        Line(s, "direct from the upstream", m("cold_single.direct_s"), "s"),
        Line(s, "txregistry", m("cold_single.txregistry_s"), "s"),
        Line(s, "peer", m("cold_single.peer_s"), "s"),
        Line(s, "txregistry / direct", m("cold_single.txregistry_s") / m("cold_single.direct_s"),
             "x", Target(True, 1.15)),
        Line(s, "peer / direct", m("cold_single.peer_s") / m("cold_single.direct_s"), "x"),
        Line(s, "floor: sha256 of the blob on one core", m("cold_single.sha256_s"), "s"),
        Line(s, "floor / direct", m("cold_single.sha256_s") / m("cold_single.direct_s"), "x"),
    ]  # fmt: skip

    for number, kind, clients in ((2, "single", "one client"), (4, "fan_out", None)):
        clients = clients or f"{sizes.fan_out} clients, aggregate"
        s = f"{number}. Warm, {clients}"
        tx = m(f"warm_{kind}.txregistry_mb_s")
        peer = m(f"warm_{kind}.peer_mb_s")
        nginx = max(m(f"warm_{kind}.nginx_sendfile_mb_s"), m(f"warm_{kind}.nginx_copy_mb_s"))
        out += [
            Line(s, "txregistry", tx, "MB/s"),
            Line(s, "peer", peer, "MB/s"),
            Line(s, "nginx, sendfile on", m(f"warm_{kind}.nginx_sendfile_mb_s"), "MB/s"),
            Line(s, "nginx, sendfile off", m(f"warm_{kind}.nginx_copy_mb_s"), "MB/s"),
            Line(s, "txregistry / faster nginx", tx / nginx, "x", Target(False, 0.9)),
            Line(s, "txregistry / peer", tx / peer, "x", Target(False, 1.0)),
        ]
        if number == 2:
            s = f"3. Cold, {sizes.fan_out} clients on the same blob"
            direct = m("cold_fan_out.direct_one_s")
            out += [
                Line(s, "one client, direct from the upstream", direct, "s"),
                Line(s, "txregistry, until the last client is done", m("cold_fan_out.txregistry_s"),
                     "s"),
                Line(s, "peer, until the last client is done", m("cold_fan_out.peer_s"), "s"),
                Line(s, "txregistry / one direct", m("cold_fan_out.txregistry_s") / direct, "x",
                     Target(True, 1.5)),
                Line(s, "peer / one direct", m("cold_fan_out.peer_s") / direct, "x"),
                Line(s, "floor: faster nginx, 8 clients, from disk", m("cold_fan_out.nginx_s"),
                     "s"),
                Line(s, "floor / one direct", m("cold_fan_out.nginx_s") / direct, "x"),
                Line(s, "upstream GETs of the blob, txregistry (worst run)",
                     worst("cold_fan_out.txregistry_upstream_gets"), "GETs", Target(True, 1)),
                Line(s, "upstream GETs of the blob, peer (worst run)",
                     worst("cold_fan_out.peer_upstream_gets"), "GETs"),
            ]  # fmt: skip

    s = f"5. Manifest by tag, cached, wrk at {sizes.connections} connections"
    out += [
        Line(s, "txregistry", m("manifest.txregistry_rps"), "req/s"),
        Line(s, "peer", m("manifest.peer_rps"), "req/s"),
        Line(s, "txregistry / peer", m("manifest.txregistry_rps") / m("manifest.peer_rps"), "x",
             Target(False, 3.0)),
        Line(s, "txregistry, p99 latency", m("manifest.txregistry_p99_ms"), "ms"),
        Line(s, "peer, p99 latency", m("manifest.peer_p99_ms"), "ms"),
    ]  # fmt: skip

    s = f"6. txregistry's memory, {sizes.memory_blob // MiB} MiB blob"
    out += [
        Line(s, "peak RSS added, streaming it cold", worst("memory.cold_added_mib"), "MiB",
             Target(True, 50)),
        Line(s, "peak RSS added, serving it warm", worst("memory.warm_added_mib"), "MiB",
             Target(True, 50)),
    ]  # fmt: skip

    layers = f"{sizes.image_layers} layers of {sizes.layer_size // MiB} MiB"
    s = f"7. Whole image, skopeo copy, {layers}"
    for temperature in ("cold", "warm"):
        tx = m(f"image.{temperature}_txregistry_s")
        direct = m(f"image.{temperature}_direct_s")
        peer = m(f"image.{temperature}_peer_s")
        out += [
            Line(s, f"{temperature}: direct from the upstream", direct, "s"),
            Line(s, f"{temperature}: txregistry", tx, "s"),
            Line(s, f"{temperature}: peer", peer, "s"),
            Line(s, f"{temperature}: txregistry / direct", tx / direct, "x"),
            Line(s, f"{temperature}: txregistry / peer", tx / peer, "x"),
        ]
    return out


def table(figures: list[Line]) -> str:
    rows = ["| Measurement | Figure | Target | Met |", "|---|---:|---|---|"]
    scenario = None
    for line in figures:
        if line.scenario != scenario:
            scenario = line.scenario
            rows.append(f"| **{scenario}** | | | |")
        met = {None: "", True: "yes", False: "**no**"}[line.met]
        rows.append(f"| {line.label} | {line.shown()} | {line.target or ''} | {met} |")
    return "\n".join(rows)


def _first_line(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except OSError:
        return "not installed"
    output = (done.stdout or done.stderr).strip()
    return output.splitlines()[0] if output else "unknown"


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    memory = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    os_release = Path("/etc/os-release").read_text()
    pretty = re.search(r'PRETTY_NAME="(.*)"', os_release)
    return {
        "cpu": f"{cpu[1] if cpu else 'unknown'}, {os.cpu_count()} cores",
        "memory": f"{int(memory[1]) / (1 << 20):.0f} GiB" if memory else "unknown",
        "os": f"{pretty[1] if pretty else 'unknown'}, Linux {platform.release()}",
        "python": platform.python_version(),
        "peer": _first_line(["docker-registry", "--version"]),
        "nginx": _first_line(["nginx", "-v"]),
        "curl": " ".join(_first_line(["curl", "--version"]).split()[:2]),
        "wrk": _first_line(["wrk", "-v"]),
        "skopeo": _first_line(["skopeo", "--version"]),
    }


def markdown(figures: list[Line], sizes: Sizes, quick: bool) -> str:
    described = machine()
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    details = "\n".join(f"- {name}: {value}" for name, value in described.items())
    mode = "bench/run --quick" if quick else "bench/run"
    return (
        f"Measured {now} with `{mode}`: medians of {sizes.runs} runs, all on loopback.\n\n"
        f"{details}\n\n{table(figures)}\n"
    )


def write_section(path: Path, section: str) -> None:
    """Replace the bench's section of C{path}, keeping what is around it."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + block + after
    else:
        text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text)


def as_json(figures: list[Line], samples: Samples, sizes: Sizes) -> str:
    return json.dumps(
        {
            "sizes": asdict(sizes),
            "samples": samples,
            "figures": [
                {**asdict(line), "met": line.met, "finite": math.isfinite(line.value)}
                for line in figures
            ],
        },
        indent=2,
        default=str,
    )
