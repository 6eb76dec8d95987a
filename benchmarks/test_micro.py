"""Micro benchmarks with pytest-benchmark (not part of the test suite: run them on purpose).

    python -m pytest benchmarks/test_micro.py --benchmark-only --benchmark-group-by=param:case

One group per layer case; compare the providers' rows within a group (same run, same machine).
"""
import pytest

from proper.bench.layer_cases import LayerCase, make_inputs
from proper.bench.providers import providers

CASES = {
    "decode64": LayerCase("decode", 64, "distinct", 16, False, 8, 2),
    "decode64-noexp": LayerCase("decode", 64, "distinct", 16, False, 0, 0),
    "prefill16": LayerCase("prefill", 16, "uniform", 16, False, 8, 2),
    "decode64-train": LayerCase("decode", 64, "distinct", 16, False, 8, 2, training=True),
}
PROVIDERS = providers("cpu")


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer(benchmark, case, provider):
    fn = PROVIDERS[provider](CASES[case], make_inputs(CASES[case]))
    if fn is None:
        pytest.skip(f"{provider} cannot run {case}")
    benchmark(fn)
