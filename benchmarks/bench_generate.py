"""Thin script over proper.bench.generate (the benchmark code is packaged, so `proper bench` works from any install).

    python -m benchmarks.bench_generate --help
"""
import sys

from proper.bench.generate import main

if __name__ == "__main__":
    sys.exit(main())
