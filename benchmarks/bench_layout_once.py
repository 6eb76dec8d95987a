"""Thin script over proper.bench.layout_once (the benchmark code is packaged, so `proper bench` works from any install).

    python -m benchmarks.bench_layout_once --help
"""
import sys

from proper.bench.layout_once import main

if __name__ == "__main__":
    sys.exit(main())
