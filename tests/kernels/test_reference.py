"""The reference semantics itself: an explicit per-token loop, fp64 gradcheck, NaN padding, structural zeros."""
import pytest
import torch

import proper_kernels as pk
from cases import check_backend, make_case


def loop_oracle(case):
    """The semantics written the slowest, most obvious way: one token, one expert at a time, in fp64."""
    x = case["x"].double()
    T = x.shape[0]
    d_out = (case["expert_b"] if case.get("expert_b") is not None else case["user_b"]).shape[1]
    y = torch.zeros(T, d_out, dtype=torch.float64)
    for t in range(T):
        if case.get("expert_a") is not None:
            for k in range(case["expert_a"].shape[0]):
                g = case["gates"][t, k].double()
                if g != 0:
                    a, b = case["expert_a"][k].double(), case["expert_b"][k].double()
                    y[t] += case["expert_scale"] * g * (b @ (a @ x[t]))
        if case.get("user_a") is not None:
            u = int(case["user_ids"][t])
            if u >= 0:
                r = case["user_a"].shape[1] if case.get("user_ranks") is None else int(case["user_ranks"][u])
                s = case.get("user_scale", 1.0)
                s = float(s[u]) if isinstance(s, torch.Tensor) else float(s)
                w = float(case["user_weight"][t]) if case.get("user_weight") is not None else 1.0
                a, b = case["user_a"][u, :r].double(), case["user_b"][u, :, :r].double()
                y[t] += w * s * (b @ (a @ x[t]))
    return y


@pytest.mark.parametrize("popularity", ["distinct", "zipf", "half_none", "one_hot"])
@pytest.mark.parametrize("K", [0, 1, 5])
def test_reference_matches_loop(popularity, K):
    case = make_case(T=19, d_in=13, d_out=11, K=K, r_e=3, U=5, r_max=6, popularity=popularity,
                     dtype=torch.float64, seed=K)
    got = pk.routed_lora_reference(case["x"], case["expert_a"], case["expert_b"], case["gates"], case["user_a"],
                                   case["user_b"], case["user_ids"], user_ranks=case["user_ranks"],
                                   expert_scale=case.get("expert_scale", 1.0), user_scale=case["user_scale"],
                                   user_weight=case["user_weight"])
    torch.testing.assert_close(got, loop_oracle(case), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", ["reference", "torch_backend"])
def test_gradcheck_fp64(fn):
    case = make_case(T=9, d_in=7, d_out=6, K=3, r_e=2, U=4, r_max=3, top_k=0, dtype=torch.float64,
                     nan_pad=False, popularity="half_none")
    ids, ranks, us = case["user_ids"], case["user_ranks"], case["user_scale"]

    def f(x, ea, eb, g, ua, ub, w):
        if fn == "reference":
            return pk.routed_lora_reference(x, ea, eb, g, ua, ub, ids, user_ranks=ranks, expert_scale=0.7,
                                            user_scale=us, user_weight=w)
        return pk.routed_lora(x, ea, eb, g, ua, ub, ids, user_ranks=ranks, expert_scale=0.7, user_scale=us,
                              user_weight=w, backend="torch")

    inputs = [case[k].double().requires_grad_() for k in
              ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_weight")]
    assert torch.autograd.gradcheck(f, inputs)


def test_nan_padding_never_read():
    case = make_case(dtype=torch.float32, ranks=[16, 3, 1, 0, 8, 5], nan_pad=True)
    y = pk.routed_lora(*[case[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b",
                                           "user_ids")], user_ranks=case["user_ranks"], backend="torch")
    assert torch.isfinite(y).all()
    check_backend("torch", case)


def test_structural_zero_gates_have_no_gradient():
    case = make_case(K=4, top_k=1, dtype=torch.float64, users=False)
    g = case["gates"].double().requires_grad_()
    y = pk.routed_lora(case["x"], case["expert_a"], case["expert_b"], g, None, None, None, backend="torch")
    y.sum().backward()
    assert (g.grad[case["gates"] == 0] == 0).all()
    assert (g.grad[case["gates"] != 0] != 0).all()


def test_out_accumulates_in_place():
    case = make_case()
    base = torch.randn(case["x"].shape[0], 40)
    out = base.clone()
    args = [case[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
    kw = dict(user_ranks=case["user_ranks"], expert_scale=0.5, user_scale=case["user_scale"],
              user_weight=case["user_weight"])
    r = pk.routed_lora(*args, **kw, out=out)
    assert r is out
    torch.testing.assert_close(out, base + pk.routed_lora(*args, **kw), rtol=1e-6, atol=1e-6)


def test_no_user_tokens_get_only_expert_term():
    case = make_case(popularity="half_none")
    none = case["user_ids"] < 0
    args = [case[k] for k in ("x", "expert_a", "expert_b", "gates")]
    full = pk.routed_lora(*args, case["user_a"], case["user_b"], case["user_ids"], expert_scale=0.5,
                          user_ranks=case["user_ranks"])
    experts_only = pk.routed_lora(*args, None, None, None, expert_scale=0.5)
    torch.testing.assert_close(full[none], experts_only[none])
    assert not torch.allclose(full[~none], experts_only[~none])


def test_torch_compile_fullgraph_forward_backward():
    case = make_case(T=12, d_in=16, d_out=8, K=3, r_e=4, U=3, r_max=4)
    ids, rk = case["user_ids"], case["user_ranks"]

    def f(x, ea, eb, g, ua, ub):
        return pk.routed_lora(x, ea, eb, g, ua, ub, ids, user_ranks=rk, expert_scale=0.5, user_scale=2.0,
                              backend="torch")

    leaves = [case[k].detach().clone().requires_grad_() for k in ("x", "expert_a", "expert_b", "gates",
                                                                  "user_a", "user_b")]
    y = torch.compile(f, fullgraph=True)(*leaves)
    y.square().sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y_ref = f(*ref_leaves)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


def test_opcheck_custom_op():
    case = make_case(T=5, d_in=8, d_out=6, K=2, r_e=2, U=3, r_max=4, nan_pad=False)
    args = (case["x"], case["expert_a"], case["expert_b"], case["gates"], case["user_a"], case["user_b"],
            case["user_ids"], case["user_ranks"], 0.5, case["user_scale"], case["user_weight"], "torch")
    torch.library.opcheck(torch.ops.proper.routed_lora.default, args)


def test_empty_batch():
    case = make_case(T=0)
    x = case["x"].requires_grad_()
    y = pk.routed_lora(x, case["expert_a"], case["expert_b"], case["gates"], case["user_a"], case["user_b"],
                       case["user_ids"])
    assert y.shape == (0, 40)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("popularity", ["uniform", "half_none"])
def test_naive_loop_baseline_matches_reference(popularity):
    from proper_kernels.baselines import naive_loop

    case = make_case(T=29, popularity=popularity, dtype=torch.float64, nan_pad=True)
    args = [case[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
    kw = {k: case[k] for k in ("user_ranks", "expert_scale", "user_scale", "user_weight")}
    torch.testing.assert_close(naive_loop(*args, **kw), loop_oracle(case), rtol=1e-10, atol=1e-10)
