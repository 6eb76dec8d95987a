"""What users would write without this package: a loop over experts and unique users with torch matmuls.

Used by the demo and the benchmarks as the "naive loop" provider. Same semantics as the reference (checked
in tests), but one pair of matmuls per expert and per user present in the batch, with host syncs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def naive_loop(x: Tensor, expert_a, expert_b, gates, user_a, user_b, user_ids, *, user_ranks=None,
               expert_scale: float = 1.0, user_scale=None, user_weight=None) -> Tensor:
    """routed_lora semantics via per-expert and per-user matmuls (the peft / MoE-LoRA trainer style)."""
    T = x.shape[0]
    d_out = expert_b.shape[1] if expert_b is not None else user_b.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(T, d_out, dtype=acc, device=x.device)
    xf = x.to(acc)
    if expert_a is not None:
        for k in range(expert_a.shape[0]):
            g = gates[:, k].to(acc) * expert_scale                            # [T]
            rows = torch.nonzero(g).flatten()                                # tokens that selected expert k
            if rows.numel():
                h = xf[rows] @ expert_a[k].to(acc).t()                       # [t, r_e]
                y.index_add_(0, rows, (h @ expert_b[k].to(acc).t()) * g[rows, None])
    if user_a is not None:
        for u in torch.unique(user_ids).tolist():
            if u < 0:
                continue
            rows = torch.nonzero(user_ids == u).flatten()
            r = user_a.shape[1] if user_ranks is None else int(user_ranks[u])
            if r == 0:
                continue
            c = torch.ones(rows.numel(), dtype=acc, device=x.device)
            if user_scale is not None:
                c = c * (float(user_scale[u]) if isinstance(user_scale, Tensor) else float(user_scale))
            if user_weight is not None:
                c = c * user_weight[rows].to(acc)
            h = xf[rows] @ user_a[u, :r].to(acc).t()                          # [t, r_u]
            y.index_add_(0, rows, (h @ user_b[u, :, :r].to(acc).t()) * c[:, None])
    return y.to(x.dtype)
