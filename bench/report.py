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
from txregistry.repository.segments import SEGMENT_AFTER

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
        precision = {
            "s": 3, "MB/s": 0, "x": 2, "req/s": 0, "ms": 2, "MiB": 1, "GETs": 0, "runs": 0,
        }  # fmt: skip
        return f"{self.value:.{precision[self.unit]}f} {self.unit}"


class _Figures:
    """Medians and worst runs of one bench's samples."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def m(self, key: str) -> float:
        """The median; NaN when there is no sample (every one of the peer's transfers failed)."""
        samples = self.samples.get(key)
        return statistics.median(samples) if samples else math.nan

    def worst(self, key: str) -> float:
        return max(self.samples[key])


def _cold_single(f: _Figures, sizes: Sizes) -> list[Line]:
    s = f"1. Cold, one client, {sizes.blob // MiB} MiB blob"
    direct, tx, peer = (
        f.m("cold_single.direct_s"),
        f.m("cold_single.txregistry_s"),
        f.m("cold_single.peer_s"),
    )
    sha256, write = f.m("cold_single.sha256_s"), f.m("cold_single.write_s")
    floor = max(direct, sha256, write)
    return [
        Line(s, "direct from the upstream", direct, "s"),
        Line(s, "txregistry", tx, "s"),
        Line(s, "txregistry's CPU time (user + system)", f.m("cold_single.txregistry_cpu_s"), "s"),
        Line(s, "peer (serves from the upstream; stores with a second GET)", peer, "s"),
        Line(s, "peer transfers that did not complete (not in its figures)",
             sum(f.samples["cold_single.peer_incomplete"]), "runs", Target(True, 0)),
        Line(s, "floor: sha256 of the blob on one core (hashlib)", sha256, "s"),
        Line(s, "floor: dd of the blob to a new file", write, "s"),
        Line(s, "FLOOR = max(direct, sha256, dd)", floor, "s"),
        Line(s, "txregistry / FLOOR", tx / floor, "x", Target(True, 1.3)),
        Line(s, "txregistry / peer", tx / peer, "x", Target(True, 1.0)),
        Line(s, "peer / FLOOR", peer / floor, "x"),
        Line(s, "txregistry / direct", tx / direct, "x"),
    ]  # fmt: skip


def _warm(f: _Figures, number: int, kind: str, clients: str) -> list[Line]:
    s = f"{number}. Warm, {clients}"
    tx = f.m(f"warm_{kind}.txregistry_mb_s")
    peer = f.m(f"warm_{kind}.peer_mb_s")
    sendfile = f.m(f"warm_{kind}.nginx_sendfile_mb_s")
    copy = f.m(f"warm_{kind}.nginx_copy_mb_s")
    return [
        Line(s, "txregistry", tx, "MB/s"),
        Line(s, "peer", peer, "MB/s"),
        Line(s, "nginx, sendfile on", sendfile, "MB/s"),
        Line(s, "nginx, sendfile off", copy, "MB/s"),
        Line(s, "txregistry / faster nginx", tx / max(sendfile, copy), "x", Target(False, 0.9)),
        Line(s, "txregistry / peer", tx / peer, "x", Target(False, 1.0)),
    ]


def _throttled(f: _Figures, sizes: Sizes) -> list[Line]:
    rate = sizes.throttle_rate
    s = (
        f"11. Cold, one client, {sizes.throttled_blob // MiB} MiB, the upstream sending each"
        f" connection at {rate / MiB:g} MiB/s"
    )
    direct, tx = f.m("throttled.direct_s"), f.m("throttled.txregistry_s")
    segments = sizes.segments if sizes.throttled_blob > sizes.segments_above else 1
    bound = sizes.throttled_blob / (segments * rate)
    return [
        Line(s, "direct from the upstream (one connection)", direct, "s"),
        Line(s, f"txregistry (up to {segments} segments, from {SEGMENT_AFTER:g} s on)", tx, "s"),
        Line(s, "bound: size / (segments x per-connection rate)", bound, "s"),
        Line(s, "direct / txregistry", direct / tx, "x", Target(False, 2.0)),
        Line(s, "txregistry / bound", tx / bound, "x", Target(True, 1.3)),
        Line(s, "txregistry's peak RSS added, segmented (worst run)",
             f.worst("throttled.txregistry_added_mib"), "MiB", Target(True, 50)),
    ]  # fmt: skip


def _warm_single(f: _Figures, sizes: Sizes) -> list[Line]:
    return _warm(f, 2, "single", "one client")


def _cold_fan_out(f: _Figures, sizes: Sizes) -> list[Line]:
    s = f"3. Cold, {sizes.fan_out} clients on the same blob"
    direct = f.m("cold_fan_out.direct_one_s")
    tx, peer, nginx = (f.m(f"cold_fan_out.{name}_s") for name in ("txregistry", "peer", "nginx"))
    sha256, write = f.m("cold_fan_out.sha256_s"), f.m("cold_fan_out.write_s")
    floor8 = max(direct, sha256, write, nginx)
    n = sizes.fan_out
    return [
        Line(s, "one client, direct from the upstream", direct, "s"),
        Line(s, "txregistry, until the last client is done", tx, "s"),
        Line(s, "txregistry's CPU time (user + system)", f.m("cold_fan_out.txregistry_cpu_s"), "s"),
        Line(s, "peer, until the last client is done", peer, "s"),
        Line(s, "peer runs where a transfer did not complete (not in its figures)",
             sum(1 for c in f.samples["cold_fan_out.peer_incomplete"] if c), "runs",
             Target(True, 0)),
        Line(s, f"floor: faster nginx, {n} clients, from disk", nginx, "s"),
        Line(s, "floor: sha256 (hashlib) / dd of the blob", max(sha256, write), "s"),
        Line(s, f"FLOOR{n} = max(direct, sha256, dd, nginx {n} copies)", floor8, "s"),
        Line(s, f"txregistry / FLOOR{n}", tx / floor8, "x", Target(True, 1.3)),
        Line(s, f"peer / FLOOR{n}", peer / floor8, "x"),
        Line(s, "txregistry / one direct", tx / direct, "x"),
        Line(s, "upstream GETs of the blob, txregistry (worst run)",
             f.worst("cold_fan_out.txregistry_upstream_gets"), "GETs", Target(True, 1)),
        Line(s, "upstream GETs of the blob, peer (worst run)",
             f.worst("cold_fan_out.peer_upstream_gets"), "GETs"),
    ]  # fmt: skip


def _warm_fan_out(f: _Figures, sizes: Sizes) -> list[Line]:
    return _warm(f, 4, "fan_out", f"{sizes.fan_out} clients, aggregate")


def _manifest(f: _Figures, sizes: Sizes) -> list[Line]:
    s = f"5. Manifest by tag, cached, wrk at {sizes.connections} connections"
    tx, peer = f.m("manifest.txregistry_rps"), f.m("manifest.peer_rps")
    return [
        Line(s, "txregistry", tx, "req/s"),
        Line(s, "peer", peer, "req/s"),
        Line(s, "txregistry / peer", tx / peer, "x", Target(False, 3.0)),
        Line(s, "txregistry, p99 latency", f.m("manifest.txregistry_p99_ms"), "ms"),
        Line(s, "peer, p99 latency", f.m("manifest.peer_p99_ms"), "ms"),
    ]


def _memory(f: _Figures, sizes: Sizes) -> list[Line]:
    s = f"6. txregistry's memory, {sizes.memory_blob // MiB} MiB blob"
    return [
        Line(s, "peak RSS added, streaming it cold", f.worst("memory.cold_added_mib"), "MiB",
             Target(True, 50)),
        Line(s, "peak RSS added, serving it warm", f.worst("memory.warm_added_mib"), "MiB",
             Target(True, 50)),
    ]  # fmt: skip


def _whole_image(f: _Figures, sizes: Sizes) -> list[Line]:
    layers = f"{sizes.image_layers} layers of {sizes.layer_size // MiB} MiB"
    s = f"7. Whole image, skopeo copy, {layers}"
    out = []
    for temperature in ("cold", "warm"):
        direct, tx, peer = (
            f.m(f"image.{temperature}_{name}_s") for name in ("direct", "txregistry", "peer")
        )
        out += [
            Line(s, f"{temperature}: direct from the upstream", direct, "s"),
            Line(s, f"{temperature}: txregistry", tx, "s"),
            Line(s, f"{temperature}: peer", peer, "s"),
            Line(s, f"{temperature}: txregistry / direct", tx / direct, "x"),
            Line(s, f"{temperature}: txregistry / peer", tx / peer, "x"),
        ]
    return out


def _fleet(f: _Figures, sizes: Sizes) -> list[Line]:
    s = (
        f"8. Fleet, {sizes.fleet_nodes} nodes, {sizes.fan_out} cold clients spread over them,"
        f" {sizes.blob // MiB} MiB blob"
    )
    tx, peer = f.m("fleet.txregistry_s"), f.m("fleet.peer_s")
    local, nginx = f.m("fleet.local_tier_mb_s"), f.m("fleet.nginx_mb_s")
    return [
        Line(s, "txregistry fleet, until the last client is done", tx, "s"),
        Line(s, f"{sizes.fleet_nodes} peers (distribution proxies), until the last is done",
             peer, "s"),
        Line(s, "txregistry fleet / peers", tx / peer, "x"),
        Line(s, "upstream GETs of the blob, txregistry fleet (worst run)",
             f.worst("fleet.txregistry_upstream_gets"), "GETs", Target(True, 1)),
        Line(s, "upstream GETs of the blob, peers (worst run)",
             f.worst("fleet.peer_upstream_gets"), "GETs"),
        Line(s, "warm GET from a node's local tier", local, "MB/s"),
        Line(s, "faster nginx, from disk", nginx, "MB/s"),
        Line(s, "local tier / faster nginx", local / nginx, "x", Target(False, 0.9)),
    ]  # fmt: skip


def _push(f: _Figures, sizes: Sizes) -> list[Line]:
    s = f"9. Push, one layer of {sizes.blob // MiB} MiB (POST, then PUT with the body)"
    direct, hosted, through = (
        f.m(f"push.{name}_s") for name in ("direct", "hosted", "push_through")
    )
    return [
        Line(s, "push: direct to the origin", direct, "s"),
        Line(s, "push: txregistry, hosted", hosted, "s"),
        Line(s, "push: txregistry, push-through to the origin", through, "s"),
        Line(s, "push: hosted / direct", hosted / direct, "x"),
        Line(s, "push: push-through / direct", through / direct, "x"),
    ]


def _bucket(f: _Figures, sizes: Sizes) -> list[Line]:
    s = f"10. Warm from the bucket (Swift), empty local tier, {sizes.blob // MiB} MiB blob"
    direct, tx = f.m("bucket.direct_s"), f.m("bucket.txregistry_s")
    return [
        Line(s, "direct from Swift, presigned URL", direct, "s"),
        Line(s, "txregistry, through its local tier, verified", tx, "s"),
        Line(s, "txregistry / direct", tx / direct, "x"),
    ]


# Each scenario's figures, by the prefix of its samples' keys.
_SCENARIOS = {
    "cold_single.": _cold_single,
    "warm_single.": _warm_single,
    "cold_fan_out.": _cold_fan_out,
    "warm_fan_out.": _warm_fan_out,
    "manifest.": _manifest,
    "memory.": _memory,
    "image.": _whole_image,
    "fleet.": _fleet,
    "push.": _push,
    "bucket.": _bucket,
    "throttled.": _throttled,
}


def lines(samples: Samples, sizes: Sizes) -> list[Line]:
    """Every figure of the table, in order, for the scenarios that were run."""
    figures = _Figures(samples)
    out: list[Line] = []
    for prefix, scenario in _SCENARIOS.items():
        if any(key.startswith(prefix) for key in samples):
            out += scenario(figures, sizes)
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
