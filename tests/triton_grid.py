"""The Triton backend against the fp64 oracle, forward and every gradient, under Triton's CPU interpreter.

Not collected by a plain ``pytest`` run (no ``test_`` prefix): TRITON_INTERPRET=1 must be set before triton is
imported, so tests/test_triton.py runs this file in a subprocess with that variable set. By hand:

    TRITON_INTERPRET=1 python -m pytest -q tests/triton_grid.py

Every case runs with the rank-space scratch filled with NaN (launch.POISON_SCRATCH), so a kernel that reads a
column it never wrote (a padded rank, a tile past a user's width) fails the finiteness check.
"""
import os

import pytest
import torch

import proper_kernels as pk
from cases import POPULARITY, VARIANTS, check_backend, make_case

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (tests/test_triton.py does)", allow_module_level=True)
pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    from proper_kernels.triton import launch

    monkeypatch.setattr(launch, "POISON_SCRATCH", True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity", POPULARITY)
def test_popularity_dtypes(dtype, popularity):
    check_backend("triton", make_case(T=37, popularity=popularity, dtype=dtype, seed=3), f"triton/{popularity}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [0, 1, 8])
@pytest.mark.parametrize("T", [1, 133])
def test_tokens_experts_mixed_ranks(dtype, K, T):
    """Mixed user ranks 1..64 (one 0) with NaN padding; K = 0 is users only."""
    check_backend("triton", make_case(T=T, d_in=67, d_out=33, K=K, U=9, r_max=64, r_e=16, dtype=dtype,
                                      popularity="half_none", seed=T + K))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 133])
def test_odd_hidden_2049(dtype, T, monkeypatch):
    from proper_kernels.triton import launch

    # GPU tiles once (T=1, fp32); elsewhere wider hidden tiles keep the interpreter quick, and 2049 still ends in
    # a 1-wide masked tail tile
    if T > 1 or dtype != torch.float32:
        monkeypatch.setattr(launch, "HIDDEN_TILE", {"D": 1024, "N": 512, "C": 512})
    check_backend("triton", make_case(T=T, d_in=2049, d_out=2049, K=2, r_e=4, U=3, r_max=8, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["full_ranks", "users_only", "experts_only", "float_scale", "no_weight",
                                     "dense_gates", "nan_mixed_ranks_1_64", "no_user_tokens", "rank_above_tile"])
def test_variants(dtype, variant):
    kw = {
        **VARIANTS,
        "no_user_tokens": dict(popularity="half_none", K=3),
        # r_max > the rank tile, users on both sides of tile edges, K*r_e not a multiple of the tile
        "rank_above_tile": dict(K=3, r_e=5, U=5, r_max=80, ranks=[80, 1, 49, 64, 65]),
    }[variant]
    case = make_case(T=41, dtype=dtype, **kw)
    if variant == "no_user_tokens":
        case["user_ids"][:] = -1
    check_backend("triton", case, f"triton/{variant}")


def test_empty_groups_and_unused_users():
    """Experts no token selects and users with no token get zero gradients (not garbage)."""
    case = make_case(T=20, K=6, U=10, top_k=2)
    case["gates"][:, 4:] = 0                 # experts 4, 5: empty groups
    case["user_ids"] = case["user_ids"] % 3  # users 3..9: no tokens
    check_backend("triton", case)


@pytest.mark.parametrize("popularity", ["distinct", "zipf"])
def test_many_more_users_than_tokens(popularity):
    check_backend("triton", make_case(T=7, U=300, r_max=8, popularity=popularity))


def test_long_segments_large_blocks():
    """T > 512 switches to 64-token blocks; one hot user spans many blocks."""
    check_backend("triton", make_case(T=600, d_in=24, d_out=20, K=2, r_e=4, U=5, r_max=8, popularity="one_hot"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expert_wgrad_split_over_tokens(dtype, monkeypatch):
    """Expert weight gradients summed as per-chunk partials (a ragged last chunk included)."""
    from proper_kernels.triton import launch

    monkeypatch.setattr(launch, "WGRAD_SPLIT_TOKENS", 40)   # 133 tokens -> 3 chunks of 64, 64, 5
    check_backend("triton", make_case(T=133, d_in=24, d_out=20, K=3, r_e=8, U=4, r_max=8, dtype=dtype))


def test_non_contiguous_inputs():
    case = make_case(T=29, d_in=40, d_out=36, K=3, r_e=8, U=5, r_max=16)
    case["x"] = torch.cat([case["x"], case["x"]], 1)[:, ::2]                       # strided columns
    case["expert_b"] = case["expert_b"].transpose(1, 2).contiguous().transpose(1, 2)
    case["user_a"] = case["user_a"].transpose(1, 2).contiguous().transpose(1, 2)
    case["gates"] = case["gates"].t().contiguous().t()
    case["user_weight"] = torch.stack([case["user_weight"]] * 2, 1)[:, 1]
    assert not case["x"].is_contiguous() and not case["expert_b"].is_contiguous()
    check_backend("triton", case, "triton/non_contiguous")


def test_int32_ids_and_ranks():
    case = make_case(T=33, U=7)
    case["user_ids"] = case["user_ids"].int()
    case["user_ranks"] = case["user_ranks"].int()
    check_backend("triton", case, "triton/int32")


def _args(case):
    args = [case[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
    kw = {k: case[k] for k in ("user_ranks", "expert_scale", "user_scale", "user_weight")}
    return args, kw


def test_partial_needs_and_determinism():
    """Only some inputs need grad: those grads match the full backward; repeated runs are bitwise equal."""
    case = make_case(T=45, K=4, U=6)
    go = torch.randn(45, case["expert_b"].shape[1], generator=torch.Generator().manual_seed(5))

    def grads(names):
        c = {k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor)
                 and v.is_floating_point() else v) for k, v in case.items()}
        args, kw = _args(c)
        y = pk.routed_lora(*args, **kw, backend="triton")
        return y, torch.autograd.grad(y, [c[n] for n in names], go)

    full = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_weight")
    y_all, g_all = grads(full)
    y_again, g_again = grads(full)
    assert torch.equal(y_all, y_again) and all(torch.equal(a, b) for a, b in zip(g_all, g_again))
    for subset in [("x",), ("gates", "user_weight"), ("expert_b", "user_a")]:
        _, g_sub = grads(subset)
        for n, g in zip(subset, g_sub):
            assert torch.equal(g, g_all[full.index(n)]), n


def test_out_accumulates():
    case = make_case(T=9, K=2, U=3)
    args, kw = _args(case)
    base = torch.randn(9, case["expert_b"].shape[1])
    got = pk.routed_lora(*args, **kw, out=base.clone(), backend="triton")
    torch.testing.assert_close(got, base + pk.routed_lora(*args, **kw, backend="torch"), rtol=1e-5, atol=1e-5)


def test_shrink_skips_padded_ranks():
    """The shrink writes exactly the columns j < K*r_e + r_u of each token: no rank tile of a user's padding
    is computed or stored (the poisoned scratch keeps its NaN there)."""
    from proper_kernels.triton import launch

    case = make_case(T=50, K=2, r_e=4, U=6, r_max=64, ranks=[64, 1, 17, 0, 33, 16], popularity="half_none")
    args, kw = _args(case)
    p = pk.validate(*args, **kw)
    meta = launch.metadata(p)
    h = launch.shrink(p.x, p.expert_a, p.user_a, p, meta, gate=True)           # [T, KR + r_max]
    ids = case["user_ids"]
    r_u = torch.where(ids >= 0, case["user_ranks"][ids.clamp(min=0)], 0)
    width = meta.KR + r_u                                                       # [T]
    written = torch.arange(h.shape[1])[None, :] < width[:, None]
    assert torch.isfinite(h[written]).all() and torch.isnan(h[~written]).all()
