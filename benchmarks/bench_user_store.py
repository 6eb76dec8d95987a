"""Thin script over proper.bench.user_store (the paged user store at U = 64, 1e4, 1e6 on SmolLM2).

    python -m benchmarks.bench_user_store --out benchmarks/results
"""
import sys

from proper.bench.user_store import main

if __name__ == "__main__":
    sys.exit(main())
