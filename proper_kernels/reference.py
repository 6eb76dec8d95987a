"""Plain-torch semantics of ``routed_lora``: the single source of truth every backend is checked against.

Semantics, for every token t with u = user_ids[t]:

    delta[t] = s_e * sum_k [gates[t,k] != 0] * gates[t,k] * B_k (A_k x[t])
             + [u >= 0] * w[t] * s_u[u] * B_u[:, :r_u] (A_u[:r_u] x[t])

- Accumulation in fp32 whatever the input dtype; the result has x's dtype.
- Zero gates are structural: the expert is not selected for that token, it contributes nothing and
  d(gates)[t,k] is 0 there (as in a sparse top-k gate), which lets kernels skip unselected experts.
- Rows r >= r_u of A_u and columns r >= r_u of B_u are never read (a NaN there cannot reach the output) and
  get zero gradient. Tokens with u = -1 get no user term and d(user_weight)[t] = 0.

Written with plain differentiable torch ops, vectorised over tokens (no per-token Python loop), so autograd
gives the reference gradients and ``torch.autograd.gradcheck`` can check them in fp64.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import Problem

# Tokens per chunk of the user term are chosen so a gathered [chunk, r_max, d] block stays near this size.
_GATHER_BUDGET_ELEMS = 1 << 22


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expert_delta(x: Tensor, expert_a: Tensor, expert_b: Tensor, gates: Tensor, expert_scale: float) -> Tensor:
    """s_e * sum_k gates[t,k] B_k A_k x[t], in the accumulation dtype.  # [T, d_out]"""
    acc = _acc_dtype(x)
    K, r_e, _ = expert_a.shape
    g = gates.to(acc)
    g = g * (g != 0)                                                        # structural zeros: no gradient
    h = torch.einsum("td,krd->tkr", x.to(acc), expert_a.to(acc))           # [T, K, r_e] wide shrink
    h = h * (g * expert_scale).unsqueeze(-1)                                # gating in rank space
    b_cat = expert_b.to(acc).permute(1, 0, 2).reshape(expert_b.shape[1], K * r_e)  # [d_out, K*r_e]
    return h.reshape(h.shape[0], K * r_e) @ b_cat.t()                      # [T, d_out] one expand


def _user_coef(user_ids, user_scale, user_weight, T, acc, device):
    """Per-token factor [u >= 0] * s_u[u] * w[t] and the clamped user index.  # [T], [T]"""
    valid = user_ids >= 0
    uid = user_ids.long().clamp(min=0)
    coef = torch.ones(T, dtype=acc, device=device)
    if user_scale is not None:
        coef = coef * user_scale.to(acc)[uid]
    if user_weight is not None:
        coef = coef * user_weight.to(acc)
    return torch.where(valid, coef, torch.zeros_like(coef)), uid, valid


def _user_chunks(x, user_a, user_b, uid, valid, user_ranks, acc):
    """Yield (slice, a, b) with each chunk's tokens' adapters gathered and padded ranks zeroed.

    a: [t, r_max, d_in], b: [t, d_out, r_max]. Rows past a user's rank (and all rows for u = -1) are replaced
    by zeros with torch.where, so NaN padding never reaches a product. Chunks bound the gathered memory.
    """
    T = x.shape[0]
    U, r_max, d_in = user_a.shape
    d_out = user_b.shape[1]
    r_idx = torch.arange(r_max, device=x.device)
    chunk = max(1, _GATHER_BUDGET_ELEMS // max(1, r_max * max(d_in, d_out)))
    for s in range(0, T, chunk):                                            # static chunks, not per token
        sl = slice(s, min(T, s + chunk))
        u_c = uid[sl]
        keep = valid[sl, None]                                              # [t, 1]
        if user_ranks is not None:
            keep = keep & (r_idx[None, :] < user_ranks.long()[u_c, None])   # [t, r_max]
        else:
            keep = keep.expand(u_c.shape[0], r_max)
        a = torch.where(keep[:, :, None], user_a[u_c].to(acc), 0.0)         # [t, r_max, d_in]
        b = torch.where(keep[:, None, :], user_b[u_c].to(acc), 0.0)         # [t, d_out, r_max]
        yield sl, a, b


# The "dense over present users" strategy: one GEMM against the stacked adapters of the n users present in
# the batch, then each token keeps its own user's block. It costs n times the FLOPs of the gathered path but
# runs as two wide GEMMs, which wins when n * r_max is small (prefill: few users, many tokens each).
DENSE_MAX_WIDTH = 512


def _present_users(user_a, user_b, uniq, user_ranks, acc):
    """Stacked, rank-masked adapters of the users `uniq`. a: [n*r, d_in], b: [n*r, d_out]."""
    n, r_max = uniq.shape[0], user_a.shape[1]
    a, b = user_a[uniq].to(acc), user_b[uniq].to(acc).transpose(1, 2)      # [n, r, d_in], [n, r, d_out]
    if user_ranks is not None:
        keep = (torch.arange(r_max, device=uniq.device)[None, :] < user_ranks.long()[uniq, None])[..., None]
        a, b = torch.where(keep, a, 0.0), torch.where(keep, b, 0.0)
    return a.reshape(n * r_max, -1), b.reshape(n * r_max, -1)


def _own_block(wide, inv, r_max):
    """[T, n*r] -> [T, r]: each token's own user's block."""
    T = wide.shape[0]
    return wide.view(T, -1, r_max).gather(1, inv.view(T, 1, 1).expand(T, 1, r_max)).squeeze(1)


def _spread(h, inv, n):
    """[T, r] -> [T, n*r]: h placed in each token's own user's block, zeros elsewhere."""
    T, r_max = h.shape
    z = h.new_zeros(T, n, r_max)
    return z.scatter_(1, inv.view(T, 1, 1).expand(T, 1, r_max), h.unsqueeze(1)).view(T, n * r_max)


def _dense_plan(p: Problem, uid, strategy: str):
    """(uniq, inv) when the dense strategy is used, else None. strategy: "auto" | "dense" | "gather"."""
    if strategy == "gather":
        return None
    uniq, inv = torch.unique(uid, return_inverse=True)                     # host sync: torch backend only
    if strategy == "auto" and uniq.numel() * p.user_a.shape[1] > DENSE_MAX_WIDTH:
        return None
    return uniq, inv


def user_delta(x: Tensor, user_a: Tensor, user_b: Tensor, user_ids: Tensor, user_ranks: Optional[Tensor],
               user_scale: Optional[Tensor], user_weight: Optional[Tensor]) -> Tensor:
    """[u >= 0] w[t] s_u[u] B_u[:, :r_u] A_u[:r_u] x[t], in the accumulation dtype.  # [T, d_out]"""
    acc = _acc_dtype(x)
    coef, uid, valid = _user_coef(user_ids, user_scale, user_weight, x.shape[0], acc, x.device)
    outs = []
    for sl, a, b in _user_chunks(x, user_a, user_b, uid, valid, user_ranks, acc):
        h = torch.bmm(a, x[sl].to(acc).unsqueeze(-1)).squeeze(-1) * coef[sl, None]   # [t, r_max] shrink
        outs.append(torch.bmm(b, h.unsqueeze(-1)).squeeze(-1))                       # [t, d_out] expand
    if not outs:
        return x.new_zeros((0, user_b.shape[1]), dtype=acc)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def forward(p: Problem, strategy: str = "auto") -> Tensor:
    """The reference result of a validated problem, in x's dtype.  # [T, d_out]

    strategy (user term): "gather" (per-token gathered adapters: the oracle), "dense" (one GEMM over the users
    present) or "auto" (dense when n_present * r_max <= DENSE_MAX_WIDTH). All give the same semantics.
    """
    acc = _acc_dtype(p.x)
    y = torch.zeros(p.x.shape[0], p.d_out, dtype=acc, device=p.x.device)
    if p.has_experts:
        y = y + expert_delta(p.x, p.expert_a, p.expert_b, p.gates, p.expert_scale)
    if p.has_users:
        coef, uid, valid = _user_coef(p.user_ids, p.user_scale, p.user_weight, p.x.shape[0], acc, p.x.device)
        plan = _dense_plan(p, uid, strategy)
        if plan is None:
            y = y + user_delta(p.x, p.user_a, p.user_b, p.user_ids, p.user_ranks, p.user_scale, p.user_weight)
        else:
            uniq, inv = plan
            a, b = _present_users(p.user_a, p.user_b, uniq, p.user_ranks, acc)  # [n*r, d_in], [n*r, d_out]
            h = _own_block(p.x.to(acc) @ a.t(), inv, p.user_a.shape[1])          # [T, r] shrink
            h = torch.where(valid[:, None], h, 0.0) * coef[:, None]
            y = y + _spread(h, inv, uniq.numel()) @ b                            # [T, d_out] expand
    return y.to(p.x.dtype)


def backward(grad_out: Tensor, p: Problem, needs, strategy: str = "auto"):
    """Hand-written gradients of :func:`forward` in GRAD_NAMES order (None where not needed), fp32 accumulation.

    Tests check these against autograd through :func:`forward` (and gradcheck in fp64).
    """
    acc = _acc_dtype(p.x)
    x = p.x.to(acc)
    dy = grad_out.to(acc)                                                   # [T, d_out]
    T = x.shape[0]
    dx = torch.zeros_like(x) if needs[0] else None
    d_ea = d_eb = d_g = d_ua = d_ub = d_w = None

    if p.has_experts:
        K, r_e, d_in = p.expert_a.shape
        a = p.expert_a.to(acc)
        g = p.gates.to(acc)
        gm = g * (g != 0) * p.expert_scale                                  # [T, K]
        b_cat = p.expert_b.to(acc).permute(1, 0, 2).reshape(p.d_out, K * r_e)   # [d_out, K*r_e]
        h = torch.einsum("td,krd->tkr", x, a)                               # [T, K, r_e]
        dhg = (dy @ b_cat).reshape(T, K, r_e)                               # [T, K, r_e]
        if needs[2]:
            d_eb = torch.einsum("to,tkr->kor", dy, h * gm[..., None])
        if needs[3]:
            d_g = (dhg * h).sum(-1) * (g != 0) * p.expert_scale             # [T, K]
        dh = dhg * gm[..., None]                                            # [T, K, r_e]
        if needs[1]:
            d_ea = torch.einsum("tkr,td->krd", dh, x)
        if needs[0]:
            dx += torch.einsum("tkr,krd->td", dh, a)

    if p.has_users:
        U, r_max, d_in = p.user_a.shape
        coef, uid, valid = _user_coef(p.user_ids, p.user_scale, None, T, acc, x.device)  # without w
        w = p.user_weight.to(acc) if p.user_weight is not None else torch.ones(T, dtype=acc, device=x.device)
        d_ua = torch.zeros(p.user_a.shape, dtype=acc, device=x.device) if needs[4] else None
        d_ub = torch.zeros(p.user_b.shape, dtype=acc, device=x.device) if needs[5] else None
        d_w = torch.zeros(T, dtype=acc, device=x.device) if needs[6] else None
        plan = _dense_plan(p, uid, strategy)
        if plan is not None:
            uniq, inv = plan
            a, b = _present_users(p.user_a, p.user_b, uniq, p.user_ranks, acc)  # [n*r, d_in], [n*r, d_out]
            n = uniq.numel()
            h = torch.where(valid[:, None], _own_block(x @ a.t(), inv, r_max), 0.0)  # [T, r] = A x
            dhc = _own_block(dy @ b.t(), inv, r_max)                         # [T, r] = B^T dy
            c = (coef * w)[:, None]                                          # [T, 1]
            if d_w is not None:
                d_w = (dhc * h).sum(-1) * coef
            if d_ub is not None:
                d_bn = (_spread(h * c, inv, n).t() @ dy).view(n, r_max, -1)  # [n, r, d_out]
                d_ub.index_add_(0, uniq, d_bn.transpose(1, 2))
            dz = _spread(dhc * c, inv, n)                                    # [T, n*r]
            if d_ua is not None:
                d_ua.index_add_(0, uniq, (dz.t() @ x).view(n, r_max, -1))
            if dx is not None:
                dx += dz @ a
        else:
            for sl, a, b in _user_chunks(x, p.user_a, p.user_b, uid, valid, p.user_ranks, acc):
                h = torch.bmm(a, x[sl].unsqueeze(-1)).squeeze(-1)               # [t, r] = A x
                c = (coef[sl] * w[sl])[:, None]                                 # [t, 1]
                dhc = torch.bmm(b.transpose(1, 2), dy[sl].unsqueeze(-1)).squeeze(-1)  # [t, r] = B^T dy
                if d_w is not None:
                    d_w[sl] = (dhc * h).sum(-1) * coef[sl]
                if d_ub is not None:
                    d_ub.index_add_(0, uid[sl], dy[sl, :, None] * (h * c)[:, None, :])
                dh = dhc * c                                                    # [t, r]
                if d_ua is not None:
                    d_ua.index_add_(0, uid[sl], dh[:, :, None] * x[sl, None, :])
                if dx is not None:
                    dx[sl] += torch.bmm(a.transpose(1, 2), dh.unsqueeze(-1)).squeeze(-1)

    grads = (dx, d_ea, d_eb, d_g, d_ua, d_ub, d_w)
    return tuple(None if (gr is None or not n) else gr.to(t.dtype)
                 for gr, n, t in zip(grads, needs, p.differentiable()))


def unavailable_reason(device: torch.device):
    return None  # plain torch runs wherever torch does
