"""The op check (the first part of `proper demo`; its layer inputs also feed the benchmarks): routed_lora on
mixed users, agreement with the reference, speed vs a loop.

Two layer-level cases with many users in one batch (d = 1024, K = 8 experts of rank 16 with top-2 gates,
user ranks 4..16 with NaN in padded rows, fp32): decode (64 tokens, 64 distinct users) and prefill
(1024 tokens, 16 users). Every available backend is checked against the fp64 reference, forward and
backward, and timed against the naive loop over experts and unique users that users would otherwise write.
"""
from __future__ import annotations

from typing import Dict, List

import torch

import proper_kernels as pk
from proper_kernels.baselines import naive_loop

from .timing import measure

ARGS = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")
DIFF = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_weight")


def layer_inputs(T: int, n_users: int, *, d: int = 1024, K: int = 8, r_e: int = 16, r_max: int = 16,
                 top_k: int = 2, U: int | None = None, distinct: bool = False, seed: int = 0,
                 dtype=torch.float32, mixed_ranks: bool = True) -> Dict[str, object]:
    """routed_lora keyword arguments for one layer with `n_users` users among T tokens."""
    gen = torch.Generator().manual_seed(seed)
    U = U or max(n_users, 1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype)  # noqa: E731
    ranks = torch.randint(max(1, r_max // 4), r_max + 1, (U,), generator=gen) if mixed_ranks \
        else torch.full((U,), r_max)
    ua, ub = rnd(U, r_max, d, scale=d ** -0.5), rnd(U, d, r_max, scale=r_max ** -0.5)
    for u, r in enumerate(ranks.tolist()):   # padded rank rows hold NaN: they must never be read
        ua[u, r:] = float("nan")
        ub[u, :, r:] = float("nan")
    users = torch.randperm(U, generator=gen)[:n_users]
    ids = users[torch.arange(T) % n_users] if distinct else users[torch.randint(0, n_users, (T,), generator=gen)]
    g = torch.softmax(torch.randn(T, K, generator=gen), -1)
    g = g * torch.zeros_like(g).scatter(1, g.topk(top_k, -1).indices, 1.0) if top_k < K else g
    return {"x": rnd(T, d), "expert_a": rnd(K, r_e, d, scale=d ** -0.5), "expert_b": rnd(K, d, r_e, scale=0.25),
            "gates": g, "user_a": ua, "user_b": ub, "user_ids": ids.long(), "user_ranks": ranks,
            "expert_scale": 2.0, "user_scale": 2.0, "user_weight": torch.rand(T, generator=gen) + 0.5}


def split(inputs):
    return [inputs[k] for k in ARGS], {k: v for k, v in inputs.items() if k not in ARGS}


def max_rel_error(backend: str, inputs) -> float:
    """Largest error of output and gradients vs the fp64 reference, relative to each tensor's scale."""
    go = torch.randn(inputs["x"].shape[0], inputs["expert_b"].shape[1], generator=torch.Generator().manual_seed(1))

    def run(fn, cast=None, **kw):
        c = {k: (v.to(cast) if cast and torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in inputs.items()}
        for k in DIFF:
            c[k] = c[k].detach().requires_grad_()
        args, kwargs = split(c)
        y = fn(*args, **kwargs, **kw)
        y.backward(go.to(y.dtype))
        return [y.double()] + [c[k].grad.double() for k in DIFF]

    exact = run(pk.routed_lora_reference, cast=torch.float64)
    got = run(pk.routed_lora, backend=backend)
    return max(((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for g, e in zip(got, exact))


def run_op_demo(T_decode: int = 64, T_prefill: int = 1024, d: int = 1024) -> List[Dict[str, object]]:
    cases = {"decode: 64 tokens, 64 distinct users": layer_inputs(T_decode, T_decode, d=d, distinct=True),
             f"prefill: {T_prefill} tokens, 16 users": layer_inputs(T_prefill, 16, d=d, seed=1)}
    rows = []
    for name, inputs in cases.items():
        args, kwargs = split(inputs)
        with torch.no_grad():
            loop_ms = measure(lambda: naive_loop(*args, **kwargs))["ms"]
        for backend in pk.available_backends("cpu"):
            with torch.no_grad():
                ms = measure(lambda: pk.routed_lora(*args, **kwargs, backend=backend))["ms"]
            err = max_rel_error(backend, inputs)
            rows.append({"case": name, "backend": backend, "max_rel_err": err, "ms": ms, "loop_ms": loop_ms,
                         "speedup_vs_loop": loop_ms / ms})
    return rows


def format_op_rows(rows) -> str:
    lines = ["| case | backend | max rel. error vs fp64 ref (fwd + 7 grads) | ms | naive loop ms | speed-up |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['backend']} | {r['max_rel_err']:.1e} | {r['ms']:.2f} | "
                     f"{r['loop_ms']:.2f} | {r['speedup_vs_loop']:.2f}x |")
    return "\n".join(lines)
