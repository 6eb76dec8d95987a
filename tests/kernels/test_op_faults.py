"""Issue 16 regressions: faults stay where they belong (NaN/Inf isolation), and the op's edge cases run.

Isolation (reference.py, "Faults stay where they belong"): a non-finite value in one adapter, one token's x or
one token's incoming gradient reaches only the rows and gradients of what reads it, on every backend, forward
and backward. Edge cases: K = 0 experts without users, rank 0, U = 0 with every id -1, meta tensors with value
checks on, and torch.compile(dynamic=True, fullgraph=True) with a symbolic scale.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import proper_kernels as pk
from cases import IN_PROCESS_BACKENDS, backend_named, check_backend, check_fault_isolation, make_case

ROOT = Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")
TRITON_HERE = os.environ.get("TRITON_INTERPRET") == "1"
ARGS = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")


def small_case(dtype=torch.float32, **kw):
    """Mixed ranks (NaN padding, one rank 0), -1 tokens, top-2 gates, and expert 3 that no token selects."""
    c = make_case(T=24, d_in=12, d_out=10, K=4, r_e=3, U=5, r_max=6, popularity="half_none", seed=7,
                  dtype=dtype, **kw)
    c["gates"][:, 3] = 0
    return c


def token_of(case, user):
    hits = (case["user_ids"] == user).nonzero().flatten()
    assert hits.numel(), f"the case has no token of user {user}"
    return int(hits[0])


@pytest.fixture(params=IN_PROCESS_BACKENDS)
def backend(request):
    with backend_named(request.param) as name:
        yield name


# ------------------------------------------------------------------------------------------- isolation
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("site, index", [("user_a", (1, 0, 5)), ("user_b", (1, 9, 0))])
def test_user_fault_stays_in_its_rows(backend, site, index, value):
    case = small_case()
    token_of(case, 1)
    check_fault_isolation(backend, case, site, index, value, backend)


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("site, index", [("expert_a", (1, 2, 0)), ("expert_b", (1, 0, 2)),
                                         ("expert_a", (3, 0, 0)), ("expert_b", (3, 5, 1))],
                         ids=["a_selected", "b_selected", "a_unselected", "b_unselected"])
def test_expert_fault_stays_with_the_tokens_that_select_it(backend, site, index, value):
    case = small_case()
    assert (case["gates"][:, 1] != 0).any() and (case["gates"][:, 1] == 0).any()
    check_fault_isolation(backend, case, site, index, value, backend)


@pytest.mark.parametrize("site", ["x", "grad_out"])
def test_token_fault_stays_in_its_row(backend, site):
    case = small_case()
    check_fault_isolation(backend, case, site, (token_of(case, 2), 3), NAN, backend)


def test_issue_example_fp16_auto():
    """Issue 16: on fp16 CPU input `auto` runs the torch backend; user 3's Inf turned users 1 and -1 NaN."""
    case = make_case(T=12, d_in=16, d_out=8, K=2, r_e=2, U=4, r_max=4, dtype=torch.float16, seed=3,
                     ranks="full", nan_pad=False)
    case["user_ids"] = torch.tensor([1, -1, 3, 0] * 3)
    assert pk.resolve_backend("auto", "cpu", torch.float16) == "torch"
    check_fault_isolation("auto", case, "user_b", (3, 2, 1), INF, "auto/fp16")


# Triton runs under its interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is imported).
@pytest.mark.skipif(not TRITON_HERE, reason="runs in the TRITON_INTERPRET=1 subprocess below")
@pytest.mark.parametrize("site, index", [
    ("user_a", (1, 0, 5)), ("user_b", (1, 9, 0)), ("x", None), ("grad_out", None),
    ("expert_a", (3, 0, 0)), ("expert_b", (3, 5, 1))])
def test_triton_fault_isolation(site, index):
    case = small_case()
    index = index or (token_of(case, 2), 3)
    check_fault_isolation("triton", case, site, index, NAN, "triton")


@pytest.mark.triton
@pytest.mark.skipif(TRITON_HERE, reason="this process already interprets triton")
def test_triton_fault_isolation_subprocess():
    pytest.importorskip("triton", reason="triton is not installed")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rxX", __file__, "-k",
           "test_triton_fault_isolation and not subprocess"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                         text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-8000:]
    assert "6 passed" in out, out[-3000:]


# ------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("with_out", [False, True])
def test_no_experts_and_no_users_gives_zeros(backend, with_out):
    """K = 0 experts and no users: zeros [T, d_out], d_out from expert_b (it crashed in op.py)."""
    x = torch.randn(5, 8)
    ea, eb, g = torch.zeros(0, 2, 8), torch.zeros(0, 6, 2), torch.zeros(5, 0)
    out = torch.randn(5, 6) if with_out else None
    base = out.clone() if with_out else torch.zeros(5, 6)
    y = pk.routed_lora(x, ea, eb, g, None, None, None, out=out, backend=backend)
    assert y.shape == (5, 6) and torch.equal(y, base)
    assert out is None or y is out
    assert torch.equal(pk.routed_lora_reference(x, ea, eb, g, None, None, None), torch.zeros(5, 6))


@pytest.mark.parametrize("ranks", ["r_max_0", "all_ranks_0"])
@pytest.mark.parametrize("K", [0, 2])
def test_rank_zero_users(backend, ranks, K):
    case = make_case(T=9, d_in=8, d_out=6, K=K, r_e=2, U=3, r_max=4, popularity="half_none", seed=1)
    if ranks == "r_max_0":
        case["user_a"], case["user_b"] = case["user_a"][:, :0], case["user_b"][:, :, :0]
    case["user_ranks"] = torch.zeros(3, dtype=torch.long)
    check_backend(backend, case, f"{backend}/{ranks}")


@pytest.mark.parametrize("K", [0, 2])
def test_no_user_table_every_id_minus_one(backend, K):
    case = make_case(T=7, d_in=8, d_out=6, K=K, r_e=2, U=3, r_max=4, seed=2)
    case.update(user_a=case["user_a"][:0], user_b=case["user_b"][:0], user_ids=torch.full((7,), -1),
                user_ranks=None, user_scale=torch.ones(0))
    check_backend(backend, case, f"{backend}/U=0")


def test_meta_tensors_with_value_checks():
    """Meta tensors have shapes but no values: value checks are skipped, the result is a meta tensor."""
    case = make_case(T=5, d_in=8, d_out=6, K=2, r_e=2, U=3, r_max=4, device="meta")
    y = pk.routed_lora(*[case[k] for k in ARGS], user_ranks=case["user_ranks"], user_scale=case["user_scale"],
                       user_weight=case["user_weight"], check_values=True)
    assert y.device.type == "meta" and y.shape == (5, 6)


def test_compile_dynamic_fullgraph_symbolic_scales():
    """Under dynamic=True the scales are symbolic floats: checks.py must not call math.isfinite on them."""
    case = make_case(T=6, d_in=8, d_out=5, K=2, r_e=2, U=3, r_max=4, seed=4)
    ids, rk = case["user_ids"], case["user_ranks"]

    def f(x, ea, eb, g, ua, ub, s):
        return pk.routed_lora(x, ea, eb, g, ua, ub, ids, user_ranks=rk, expert_scale=s, user_scale=2 * s,
                              backend="torch")

    leaves = [case[k].detach().clone().requires_grad_() for k in ARGS[:6]]
    y = torch.compile(f, dynamic=True, fullgraph=True)(*leaves, 0.5)
    y.square().sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y_ref = f(*ref_leaves, 0.5)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)
