"""Every backend available on this machine against the fp64 oracle: forward and every gradient.

Triton runs in its own file (under TRITON_INTERPRET=1, in a subprocess); this grid covers the in-process
backends: the torch reference itself and the compiled cpu extension when it is built.
"""
import pytest
import torch

import proper_kernels as pk
from cases import POPULARITY, VARIANTS, check_backend, make_case

# The torch backend runs in both of its user-term strategies (gathered adapters / dense over present users).
BACKENDS = ["torch-gather", "torch-dense"] + [b for b in pk.available_backends("cpu") if b == "cpu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    from proper_kernels import reference

    name = request.param
    if name.startswith("torch-"):
        monkeypatch.setattr(reference, "DENSE_MAX_WIDTH", 0 if name == "torch-gather" else 1 << 30)
        return "torch"
    return name


def _skip_unsupported(backend, dtype):
    mod = pk.op._backend_module(backend)
    if hasattr(mod, "unsupported_reason") and mod.unsupported_reason(dtype):
        pytest.skip(mod.unsupported_reason(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity", POPULARITY)
def test_popularity_dtypes(backend, dtype, popularity):
    _skip_unsupported(backend, dtype)
    check_backend(backend, make_case(T=37, popularity=popularity, dtype=dtype, seed=3), f"{backend}/{popularity}")


@pytest.mark.parametrize("K", [0, 1, 8])
@pytest.mark.parametrize("T", [1, 133])
def test_shapes_and_experts(backend, K, T):
    check_backend(backend, make_case(T=T, d_in=67, d_out=33, K=K, U=9, r_max=64, r_e=16, seed=T + K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_hidden_2049(backend, dtype):
    _skip_unsupported(backend, dtype)
    check_backend(backend, make_case(T=5, d_in=2049, d_out=2049, K=2, r_e=4, U=3, r_max=8, dtype=dtype))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants(backend, variant):
    kw = VARIANTS[variant]
    check_backend(backend, make_case(T=41, **kw), f"{backend}/{variant}")


def test_empty_groups_and_unused_users(backend):
    """Experts no token selects and users with no token get zero gradients (not garbage)."""
    case = make_case(T=20, K=6, U=10, top_k=2)
    case["gates"][:, 4:] = 0                 # experts 4, 5: empty groups
    case["user_ids"] = case["user_ids"] % 3  # users 3..9: no tokens
    check_backend(backend, case)
