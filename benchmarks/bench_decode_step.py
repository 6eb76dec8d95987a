"""Thin script over proper.bench.decode_step (one SmolLM2 decode step of the op, against the byte floor).

    python -m benchmarks.bench_decode_step --out benchmarks/results/decode_step
"""
import sys

from proper.bench.decode_step import main

if __name__ == "__main__":
    sys.exit(main())
