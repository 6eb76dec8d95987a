"""Thin script over proper.bench.layer_overhead (the per-call overhead of one adapted layer).

    python -m benchmarks.bench_layer_overhead --out benchmarks/results
"""
import sys

from proper.bench.layer_overhead import main

if __name__ == "__main__":
    sys.exit(main())
