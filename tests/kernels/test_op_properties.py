"""Property-based checks of routed_lora: every in-process backend against the fp64 oracle on drawn problems.

Hypothesis draws the problem (T from 1, odd d_in/d_out, K in 0..4 with top-k structural zeros, U, ranks
including 0 with NaN padding, -1 users, fp32/bf16, scales, weights); each test compares the forward and all
seven gradients with tests/cases.py's dtype-aware bounds. Derandomized with a small example budget, so a CI
run is reproducible and the file takes well under a minute on two cores.
"""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import proper_kernels as pk
from cases import (DIFF_ARGS, FAULT_SITES, IN_PROCESS_BACKENDS, POPULARITY, _call, backend_named,
                   backend_supports, check_backend, check_fault_isolation, make_case)

PROPS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, dtypes=(torch.float32, torch.bfloat16)):
    """make_case arguments for one drawn problem."""
    K = draw(st.integers(0, 4))
    users = K == 0 or draw(st.booleans())
    U, r_max = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    kw = dict(T=draw(st.integers(1, 21)), d_in=draw(st.integers(1, 37)), d_out=draw(st.integers(1, 29)), K=K,
              r_e=draw(st.integers(1, 5)), top_k=draw(st.integers(0, K)), U=U, r_max=r_max, users=users,
              dtype=draw(st.sampled_from(dtypes)), popularity=draw(st.sampled_from(POPULARITY)),
              expert_scale=draw(st.sampled_from([0.5, 1.0, 2.0])),
              user_scale=draw(st.sampled_from(["vector", 0.25, None])), user_weight=draw(st.booleans()),
              seed=draw(st.integers(0, 2 ** 16)))
    kw["ranks"] = draw(st.one_of(st.just("full"), st.just("mixed"),
                                 st.lists(st.integers(0, r_max), min_size=U, max_size=U)))
    return kw


def _skip_unsupported(name, dtype):
    assume(backend_supports(name, dtype))  # drops the example (pytest.skip would skip the whole test)


def _noncontiguous(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in a non-contiguous view: last two dims transposed in memory, or every other element
    (also where a transpose would still be contiguous, e.g. a size-1 dim)."""
    if how == "transposed" and t.dim() >= 2:
        v = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if not v.is_contiguous():
            return v
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("name", IN_PROCESS_BACKENDS)
@PROPS
@given(kw=problems())
def test_matches_reference(name, kw):
    _skip_unsupported(name, kw["dtype"])
    with backend_named(name) as backend:
        check_backend(backend, make_case(**kw), f"{name} {kw}")


@pytest.mark.parametrize("name", IN_PROCESS_BACKENDS)
@PROPS
@given(kw=problems(), how=st.sampled_from(["transposed", "strided"]))
def test_noncontiguous_inputs(name, kw, how):
    _skip_unsupported(name, kw["dtype"])
    case = make_case(**kw)
    case = {k: _noncontiguous(v, how) if isinstance(v, torch.Tensor) and v.numel() > 1 else v
            for k, v in case.items()}
    assert not case["x"].is_contiguous() or case["x"].numel() == 1
    with backend_named(name) as backend:
        check_backend(backend, case, f"{name} {how} {kw}")


@pytest.mark.parametrize("name", IN_PROCESS_BACKENDS)
@PROPS
@given(kw=problems())
def test_out_accumulates(name, kw):
    """out= adds the delta in place and returns out; gradients flow through it unchanged."""
    _skip_unsupported(name, kw["dtype"])
    case = make_case(**kw)
    d_out = (case["expert_b"] if case.get("expert_b") is not None else case["user_b"]).shape[1]
    base = torch.randn(case["x"].shape[0], d_out, generator=torch.Generator().manual_seed(kw["seed"]))
    base = base.to(kw["dtype"])
    with backend_named(name) as backend:
        leaves = {k: case[k].detach().clone().requires_grad_() for k in DIFF_ARGS if case.get(k) is not None}
        plain = _call(pk.routed_lora, {**case, **leaves}, backend=backend)
        out = base.clone()
        leaves2 = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
        got = _call(pk.routed_lora, {**case, **leaves2}, backend=backend, out=out)
    assert got is out
    assert torch.equal(out.detach(), base + plain.detach())
    go = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1)).to(plain.dtype)
    plain.backward(go)
    got.backward(go)
    for k in leaves:
        assert torch.equal(leaves[k].grad, leaves2[k].grad), k


@st.composite
def faults(draw):
    """(make_case arguments, site, index, value): one non-finite value somewhere the op reads."""
    kw = draw(problems())
    case = make_case(**kw)
    sites = [s for s in FAULT_SITES if case.get(s) is not None or s == "grad_out"]
    site = draw(st.sampled_from(sites))
    if site == "grad_out":
        d_out = (case["expert_b"] if case.get("expert_b") is not None else case["user_b"]).shape[1]
        shape = (case["x"].shape[0], d_out)
    else:
        shape = tuple(case[site].shape)
    index = tuple(draw(st.integers(0, n - 1)) for n in shape)
    return kw, site, index, draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))


@pytest.mark.parametrize("name", IN_PROCESS_BACKENDS)
@PROPS
@given(fault=faults())
def test_nan_isolation(name, fault):
    kw, site, index, value = fault
    with backend_named(name) as backend:
        check_fault_isolation(backend, make_case(**kw), site, index, value, name)
