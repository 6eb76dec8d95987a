"""Problem generators and dtype-aware comparisons shared by every backend's tests.

A case is a dict of ``routed_lora`` arguments. The oracle is ``routed_lora_reference`` run by autograd in
fp64 on the same (already rounded) inputs; a low-precision backend is held to a small multiple of the error
the torch reference itself makes in that dtype.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import proper_kernels as pk

DIFF_ARGS = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_weight")
POPULARITY = ("distinct", "uniform", "zipf", "identical", "half_none", "one_hot")
# make_case keyword sets every backend's grid runs: each switches one part of the problem off or to an edge.
VARIANTS = {
    "full_ranks": dict(ranks="full", nan_pad=False),
    "users_only": dict(K=0),
    "experts_only": dict(users=False),
    "float_scale": dict(user_scale=2.0),
    "no_weight": dict(user_weight=False, user_scale=None),
    "dense_gates": dict(top_k=0),
    "nan_mixed_ranks_1_64": dict(U=12, r_max=64, ranks=[1, 2, 3, 4, 8, 15, 16, 17, 31, 33, 63, 64]),
}
# fp32 results must agree with the fp64 oracle to 1e-4 of the output's scale (DESIGN.md).
FP32_RTOL = 1e-4
# a low-precision backend may err at most this many times the torch reference's own error in that dtype.
LOWP_FACTOR = 3.0


def user_ids_for(popularity: str, T: int, U: int, gen: torch.Generator) -> torch.Tensor:
    if popularity == "distinct":      # every token its own user (as far as U allows)
        ids = torch.randperm(max(U, T), generator=gen)[:T] % U
    elif popularity == "uniform":
        ids = torch.randint(0, U, (T,), generator=gen)
    elif popularity == "zipf":        # a few heavy users, a long tail
        p = 1.0 / torch.arange(1, U + 1, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(p, T, replacement=True, generator=gen)
    elif popularity == "identical":
        ids = torch.full((T,), U // 2, dtype=torch.long)
    elif popularity == "half_none":   # half the tokens have no user adapter
        ids = torch.randint(0, U, (T,), generator=gen)
        ids[torch.randperm(T, generator=gen)[: T // 2]] = -1
    elif popularity == "one_hot":     # one hot user, the rest spread out
        ids = torch.randint(0, U, (T,), generator=gen)
        ids[torch.rand(T, generator=gen) < 0.8] = 0
    else:
        raise ValueError(popularity)
    return ids.long()


def make_case(T=33, d_in=48, d_out=40, K=4, r_e=8, U=6, r_max=16, *, ranks="mixed", popularity="uniform",
              dtype=torch.float32, top_k=2, nan_pad=True, user_weight=True, user_scale="vector",
              expert_scale=0.5, users=True, seed=0, device="cpu"):
    """Random routed_lora arguments. ranks: "full" | "mixed" (1..r_max, some 0) | list of ints."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    case = {"x": rnd(T, d_in)}
    if K > 0:
        case["expert_a"] = rnd(K, r_e, d_in, scale=1 / math.sqrt(d_in))
        case["expert_b"] = rnd(K, d_out, r_e, scale=1 / math.sqrt(r_e))
        logits = torch.randn(T, K, generator=gen, dtype=torch.float64)
        g = torch.softmax(logits, -1)
        if top_k and top_k < K:       # structural zeros outside the top-k
            keep = torch.zeros_like(g).scatter(1, g.topk(top_k, -1).indices, 1.0)
            g = g * keep
        case["gates"] = g.float()
        case["expert_scale"] = expert_scale
    else:
        case.update(expert_a=None, expert_b=None, gates=None)
    if users:
        ua = rnd(U, r_max, d_in, scale=1 / math.sqrt(d_in))
        ub = rnd(U, d_out, r_max, scale=1 / math.sqrt(r_max))
        if ranks == "full":
            rk = None
        else:
            rk = torch.tensor(ranks) if isinstance(ranks, (list, tuple)) else \
                torch.randint(1, r_max + 1, (U,), generator=gen)
            if ranks == "mixed":
                rk[0] = r_max
                if U > 2:
                    rk[-1] = 0 if U > 3 else 1        # a user with rank 0 (no adapter trained yet)
            if nan_pad:
                for u, r in enumerate(rk.tolist()):
                    ua[u, r:] = float("nan")
                    ub[u, :, r:] = float("nan")
        case.update(user_a=ua, user_b=ub, user_ids=user_ids_for(popularity, T, U, gen), user_ranks=rk)
        if user_scale == "vector":
            case["user_scale"] = torch.rand(U, generator=gen) + 0.5
        elif user_scale is not None:
            case["user_scale"] = float(user_scale)
        if user_weight:
            case["user_weight"] = torch.rand(T, generator=gen).float()
    else:
        case.update(user_a=None, user_b=None, user_ids=None)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _call(fn, case, **kw):
    args = [case.get(k) for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
    kwargs = {k: case[k] for k in ("user_ranks", "expert_scale", "user_scale", "user_weight") if k in case}
    return fn(*args, **kwargs, **kw)


def run_with_grads(fn, case, grad_out, cast=None, **kw):
    """Output and the gradients of every differentiable input present, as a dict of fp64 tensors."""
    c = dict(case)
    leaves = {}
    for k in DIFF_ARGS:
        if c.get(k) is not None:
            t = c[k].detach()
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            leaves[k] = c[k] = t.requires_grad_(True)
    if cast is not None:
        for k in ("user_scale",):
            if isinstance(c.get(k), torch.Tensor):
                c[k] = c[k].to(cast)
    y = _call(fn, c, **kw)
    y.backward(grad_out.to(y.dtype))
    res = {"out": y.detach().double()}
    for k, t in leaves.items():
        res["d_" + k] = t.grad.double() if t.grad is not None else torch.zeros_like(t, dtype=torch.float64)
    return res


def oracle(case, grad_out):
    """fp64 reference by autograd (the oracle) and the torch reference in the case's own dtype."""
    exact = run_with_grads(pk.routed_lora_reference, case, grad_out, cast=torch.float64)
    own = run_with_grads(pk.routed_lora, case, grad_out, backend="torch")
    return exact, own


def assert_matches(got: dict, exact: dict, own: dict, dtype: torch.dtype, label=""):
    """Every output and gradient of a backend against the fp64 oracle, with a dtype-aware bound."""
    assert got.keys() == exact.keys(), (got.keys(), exact.keys())
    for k in exact:
        g, e = got[k], exact[k]
        assert g.shape == e.shape, f"{label} {k}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(g).all(), f"{label} {k}: non-finite values (NaN padding leaked?)"
        scale = max(e.abs().max().item(), 1e-30) if e.numel() else 1.0
        err = (g - e).abs().max().item() if e.numel() else 0.0
        if dtype in (torch.float32, torch.float64):
            bound = FP32_RTOL * scale if dtype == torch.float32 else 1e-10 * scale
        else:
            own_err = (own[k] - e).abs().max().item() if e.numel() else 0.0
            # the reference's own rounding error in this dtype, floored at half an ulp of the output scale
            half_ulp = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12}[dtype]
            bound = LOWP_FACTOR * max(own_err, half_ulp * scale)
        assert err <= bound, f"{label} {k}: max abs error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})"


def grad_out_for(case, d_out, seed=1):
    gen = torch.Generator().manual_seed(seed)
    T = case["x"].shape[0]
    return torch.randn(T, d_out, generator=gen, dtype=torch.float64).to(case["x"].device)


def check_backend(backend: str, case: dict, label=""):
    """Run `backend` forward + backward on `case` and compare everything with the oracle."""
    d_out = (case["expert_b"] if case.get("expert_b") is not None else case["user_b"]).shape[1]
    go = grad_out_for(case, d_out)
    exact, own = oracle(case, go)
    got = run_with_grads(pk.routed_lora, case, go, backend=backend)
    assert_matches(got, exact, own, case["x"].dtype, label or backend)


# ------------------------------------------------------------------------------------------ backend names
# In-process backends by test name: the torch backend in each of its user-term strategies, and the compiled
# cpu extension when it is built. Triton needs TRITON_INTERPRET=1 before import (see tests/test_triton.py).
IN_PROCESS_BACKENDS = ["torch-gather", "torch-dense"] + [b for b in pk.available_backends("cpu") if b == "cpu"]


@contextlib.contextmanager
def backend_named(name: str):
    """Yields the routed_lora backend for a test name of IN_PROCESS_BACKENDS (pins the torch strategy)."""
    from proper_kernels import reference

    if not name.startswith("torch-"):
        yield name
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "DENSE_MAX_WIDTH", 0 if name == "torch-gather" else 1 << 30)
        yield "torch"


def backend_supports(name: str, dtype: torch.dtype) -> bool:
    mod = pk.op._backend_module(name.split("-")[0])
    return not (hasattr(mod, "unsupported_reason") and mod.unsupported_reason(dtype))


# ---------------------------------------------------------------------------------------- fault isolation
FAULT_SITES = ("expert_a", "expert_b", "user_a", "user_b", "x", "grad_out")


def fault_reach(case: dict, site: str, index: tuple) -> dict:
    """Where a non-finite value at case[site][index] may show up (the contract in reference.py's docstring).

    Returns {result key: bool mask}; every entry outside the masks must stay finite and exact. "reads" marks
    the tokens whose output row must turn non-finite (an adapter reads the fault). site "grad_out" is the
    incoming gradient (index (t, o)).
    """
    T = case["x"].shape[0]
    has_e, has_u = case.get("expert_a") is not None, case.get("user_a") is not None
    tokens = torch.zeros(T, dtype=torch.bool)                  # tokens that may see the faulty value
    reads = torch.ones(T, dtype=torch.bool)                    # ... and of those, the ones that must
    experts = torch.zeros(case["expert_a"].shape[0] if has_e else 0, dtype=torch.bool)
    users = torch.zeros(case["user_a"].shape[0] if has_u else 0, dtype=torch.bool)
    if site in ("expert_a", "expert_b"):
        experts[index[0]] = True
        tokens = case["gates"][:, index[0]] != 0
    elif site in ("user_a", "user_b"):
        u = index[0]
        rank = case["user_a"].shape[1] if case.get("user_ranks") is None else int(case["user_ranks"][u])
        r = index[1] if site == "user_a" else index[2]
        if r < rank:                                          # padding past the rank is never read
            users[u] = True
            tokens = case["user_ids"] == u
    else:                                                     # one token's x or incoming gradient
        t = index[0]
        tokens[t] = True
        if has_e:
            experts = (case["gates"][t] != 0).clone()
        u = int(case["user_ids"][t]) if has_u else -1
        if u >= 0:
            users[u] = True
        rank_u = 0 if u < 0 else case["user_a"].shape[1] if case.get("user_ranks") is None else \
            int(case["user_ranks"][u])
        if not experts.any() and rank_u == 0:
            reads[t] = False                                  # no adapter reads x[t]: its delta is exactly 0
    reach = {"d_x": tokens[:, None].expand_as(case["x"])}
    if site != "grad_out":
        reach["out"] = tokens[:, None]
        reach["reads"] = tokens & reads
    if has_e:
        cols = experts if site in ("expert_a", "expert_b") else torch.ones_like(experts)
        reach["d_gates"] = tokens[:, None] & cols[None, :] & (case["gates"] != 0)
        reach["d_expert_a"] = reach["d_expert_b"] = experts[:, None, None]
    if has_u:
        reach["d_user_a"] = reach["d_user_b"] = users[:, None, None]
        reach["d_user_weight"] = tokens
    return reach


def check_fault_isolation(backend: str, case: dict, site: str, index: tuple, value=float("nan"), label=""):
    """Put `value` at case[site][index], run `backend` forward + backward, and check the fault stays put.

    Outside fault_reach every output and gradient must match the oracle of the clean case (assert_matches);
    when the fault sits in an adapter or x, each token that reads it gets a non-finite output row (faults are
    never hidden).
    """
    d_out = (case["expert_b"] if case.get("expert_b") is not None else case["user_b"]).shape[1]
    go = grad_out_for(case, d_out)
    exact, own = oracle(case, go)
    bad, bad_go = dict(case), go.clone()
    if site == "grad_out":
        bad_go[index] = value
    else:
        bad[site] = case[site].clone()
        bad[site][index] = value
    got = run_with_grads(pk.routed_lora, bad, bad_go, backend=backend)
    reach = fault_reach(case, site, index)
    if "reads" in reach:
        rows = reach.pop("reads")
        hidden = torch.isfinite(got["out"][rows]).all(1)
        assert not hidden.any(), f"{label} {site}{index}: fault hidden in rows {rows.nonzero()[hidden].tolist()}"

    def outside(res):
        return {k: torch.where(reach[k], 0.0, v) if k in reach else v for k, v in res.items()}

    assert_matches(outside(got), outside(exact), outside(own), case["x"].dtype, f"{label} {site}{index}={value}")
