"""txregistry's benchmarks: see bench/run and bench/RESULTS.md."""
