"""
python -m bench [--quick] [--output FILE] [--json FILE] [--keep DIR]

Runs the ten measurements against txregistry, the peer (a distribution
registry in proxy mode) and the references (the upstream directly, nginx),
all on loopback, and prints the table.  bench/run installs what this needs
and runs it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
# The test harness's images, skopeo and registry helpers.
sys.path.insert(0, str(ROOT / "tests"))

from bench.report import as_json, lines, markdown, write_section  # noqa: E402
from bench.scenarios import FULL, QUICK, Bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small sizes and one short run each")
    parser.add_argument(
        "--output",
        type=Path,
        help="write the table into this Markdown file (by default bench/RESULTS.md,"
        " except with --quick)",
    )
    parser.add_argument("--json", type=Path, help="write every sample and figure as JSON")
    parser.add_argument(
        "--only",
        type=lambda text: {int(n) for n in text.split(",")},
        default=set(range(1, 11)),
        help="run only these scenarios, by number: --only 1,3",
    )
    parser.add_argument("--keep", type=Path, help="work in this directory and keep the logs")
    parser.add_argument(
        "--segments",
        type=int,
        help="run txregistry with this many segments per download (for A/B runs;"
        " by default its own default)",
    )
    options = parser.parse_args(argv)
    sizes = QUICK if options.quick else FULL
    if options.segments is not None:
        sizes = replace(sizes, segments=options.segments)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="txregistry-bench-") as scratch:
        directory = options.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        bench = Bench(directory, sizes, say, options.segments is not None)
        try:
            bench.start()
            samples = bench.run(options.only)
        finally:
            bench.stop()
    figures = lines(samples, sizes)
    section = markdown(figures, sizes, options.quick)
    print(section)
    output = options.output or (None if options.quick else RESULTS)
    if output:
        write_section(output, section)
        say(f"written to {output}")
    if options.json:
        options.json.write_text(as_json(figures, samples, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
