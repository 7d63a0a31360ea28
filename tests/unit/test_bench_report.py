"""The benchmark's report: its section of RESULTS.md, and its verdicts on targets."""

from pathlib import Path

from bench.report import BEGIN, END, Line, Target, lines, table, write_section
from bench.scenarios import QUICK


def test_a_new_file_gets_the_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section(path, "table one\n")
    assert path.read_text() == f"{BEGIN}\ntable one\n{END}\n"


def test_the_section_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\n\n{BEGIN}\nold table\n{END}\n\n## Optimisations\nkept\n")
    write_section(path, "new table\n")
    assert path.read_text() == (
        f"# Results\n\n{BEGIN}\nnew table\n{END}\n\n## Optimisations\nkept\n"
    )


def test_targets_are_judged_in_their_direction() -> None:
    assert Target(at_most=True, bound=1.15).met(1.15)
    assert not Target(at_most=True, bound=1.15).met(1.16)
    assert Target(at_most=False, bound=0.9).met(0.95)
    assert not Target(at_most=False, bound=0.9).met(0.89)


def _samples(value: float) -> dict[str, list[float]]:
    keys = [
        "cold_single.direct_s", "cold_single.txregistry_s", "cold_single.peer_s",
        "cold_single.sha256_s", "cold_single.write_s", "cold_fan_out.direct_one_s",
        "cold_fan_out.nginx_s",
        "cold_fan_out.txregistry_s", "cold_fan_out.peer_s",
        "cold_fan_out.txregistry_upstream_gets", "cold_fan_out.peer_upstream_gets",
        "manifest.txregistry_rps", "manifest.peer_rps", "manifest.txregistry_p99_ms",
        "manifest.peer_p99_ms", "memory.cold_added_mib", "memory.warm_added_mib",
        "cold_single.txregistry_cpu_s", "cold_single.peer_incomplete",
        "cold_fan_out.txregistry_cpu_s", "cold_fan_out.peer_incomplete",
        "cold_fan_out.sha256_s", "cold_fan_out.write_s",
        "throttled.direct_s", "throttled.txregistry_s", "throttled.txregistry_added_mib",
    ]  # fmt: skip
    for kind in ("single", "fan_out"):
        for name in ("txregistry", "peer", "nginx_sendfile", "nginx_copy"):
            keys.append(f"warm_{kind}.{name}_mb_s")
    for temperature in ("cold", "warm"):
        for name in ("direct", "txregistry", "peer"):
            keys.append(f"image.{temperature}_{name}_s")
    return {key: [value, value * 3, value * 2] for key in keys}


def test_figures_are_medians_and_counts_are_worst_runs() -> None:
    figures = {line.label: line for line in lines(_samples(1.0), QUICK)}
    assert figures["txregistry"].value == 2.0  # the median of 1, 3 and 2
    assert figures["upstream GETs of the blob, txregistry (worst run)"].value == 3.0
    assert figures["upstream GETs of the blob, txregistry (worst run)"].met is False
    assert figures["peak RSS added, streaming it cold"].value == 3.0


def test_the_table_marks_missed_targets() -> None:
    rendered = table(
        [
            Line("1. Cold", "txregistry / direct", 1.5, "x", Target(True, 1.15)),
            Line("1. Cold", "peer / direct", 1.2, "x"),
            Line("2. Warm", "txregistry / peer", 1.1, "x", Target(False, 1.0)),
        ]
    )
    assert "| txregistry / direct | 1.50 x | ≤ 1.15 | **no** |" in rendered
    assert "| peer / direct | 1.20 x |  |  |" in rendered
    assert "| txregistry / peer | 1.10 x | ≥ 1 | yes |" in rendered
    assert rendered.count(" | | | |") == 2  # one heading row per scenario
