"""Thin script over proper.bench.train_step (the benchmark code is packaged, so `proper bench` works from any install).

    python -m benchmarks.bench_train_step --help
"""
import sys

from proper.bench.train_step import main

if __name__ == "__main__":
    sys.exit(main())
