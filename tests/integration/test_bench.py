"""
The benchmark harness keeps working: its quick mode runs against real
servers and produces every figure.  Nothing here looks at a time.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import BEGIN, END

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
# Guards against a hang, never a measurement.
HANG_GUARD = 600


def test_quick_bench_produces_every_figure(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nNotes kept by hand.\n")
    figures_file = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--keep", str(tmp_path / "work"),
         "--output", str(results), "--json", str(figures_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]

    produced = json.loads(figures_file.read_text())
    figures = produced["figures"]
    scenarios = {figure["scenario"].split(".", 1)[0] for figure in figures}
    assert scenarios == {str(n) for n in range(1, 11)}
    assert all(figure["finite"] for figure in figures), figures
    counts = ("MiB", "runs")
    assert all(figure["value"] > 0 for figure in figures if figure["unit"] not in counts), figures
    # Every measurement was sampled, and the timed ones once per run; the
    # peer's only when its transfer completed.
    runs = produced["sizes"]["runs"]
    for key, samples in produced["samples"].items():
        assert samples, key
        if key.startswith(("cold_single.peer_s", "cold_fan_out.peer_s")):
            assert len(samples) <= runs, key
        elif not key.startswith("memory."):
            assert len(samples) == runs, key
    # Single-flight, seen from the upstream's own log.
    assert produced["samples"]["cold_fan_out.txregistry_upstream_gets"] == [1] * runs
    # And fleet-wide: eight clients over three nodes.
    assert produced["samples"]["fleet.txregistry_upstream_gets"] == [1] * runs

    text = results.read_text()
    assert text.startswith("# Results\n\nNotes kept by hand.\n")
    assert BEGIN in text and END in text
    for figure in figures:
        assert f"| {figure['label']} |" in text
