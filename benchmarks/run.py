"""Thin script over proper.bench.suite (the benchmark code is packaged, so `proper bench` works from any install).

    python -m benchmarks.run --help
"""
import sys

from proper.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
