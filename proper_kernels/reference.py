"""Plain-torch semantics of ``routed_lora``: the single source of truth every backend is checked against.

Semantics, for every token t with u = user_ids[t]:

    delta[t] = s_e * sum_k [gates[t,k] != 0] * gates[t,k] * B_k (A_k x[t])
             + [u >= 0] * w[t] * s_u[u] * B_u[:, :r_u] (A_u[:r_u] x[t])

- Accumulation in fp32 whatever the input dtype; the result has x's dtype.
- Zero gates are structural: the expert is not selected for that token, it contributes nothing and
  d(gates)[t,k] is 0 there (as in a sparse top-k gate), which lets kernels skip unselected experts.
- Rows r >= r_u of A_u and columns r >= r_u of B_u are never read (a NaN there cannot reach the output) and
  get zero gradient. Tokens with u = -1 get no user term and d(user_weight)[t] = 0. U = 0 users or r_max = 0
  give no user term.
- Faults stay where they belong. A non-finite value inside the part of an adapter that is read (expert k, or
  user u within rank r_u) may make non-finite only: the output rows of the tokens that use it (gates[t,k] != 0,
  or user_ids[t] == u), the d(x), d(user_weight) rows and the d(gates)[t,k] entries of those tokens, and the
  gradients of that adapter itself. The output row of every token that uses it is non-finite somewhere (a fault
  is never hidden). Likewise a non-finite x[t] or grad_out[t] reaches only token t's own rows and the gradients
  of the adapters token t uses. Every other output and gradient stays finite and exact. So no kernel may drop
  a term by multiplying it with 0 (0 * inf = nan): terms are dropped with torch.where, and a GEMM whose left
  operand is zero outside each row's own blocks runs on zeroed non-finite values with NaN put back where a
  row really reads one (:func:`_expand_isolated`, :func:`_reduce_isolated`).

Written with plain differentiable torch ops, vectorised over tokens (no per-token Python loop), so autograd
gives the reference gradients and ``torch.autograd.gradcheck`` can check them in fp64 (autograd through
:func:`forward` is an oracle for finite inputs; the fault contract is kept by :func:`forward` and
:func:`backward`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .checks import Problem

# Tokens per chunk of the user term are chosen so a gathered [chunk, r_max, d] block stays near this size.
_GATHER_BUDGET_ELEMS = 1 << 22
_NAN = float("nan")


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------- fault isolation
class _Clean(NamedTuple):
    """An operand with its non-finite entries zeroed, and which of its rows held one (None: none did)."""

    value: Tensor                # [L, N]
    bad_rows: Optional[Tensor]   # [L] bool


def _clean(q: Tensor) -> _Clean:
    """q as a GEMM operand that cannot spread a fault: non-finite entries zeroed, their rows marked.

    No host sync; meant for the small adapter operands. abs().amax() per row is exact (it cannot overflow).
    """
    return _Clean(torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0), ~torch.isfinite(q.abs().amax(-1)))


def _clean_tokens(*qs: Tensor):
    """:func:`_clean` for the big per-token operands (x, grad_out), skipped for those that are all finite.

    One host sync on cheap sums decides: a finite sum proves every entry finite (NaN and inf propagate); a sum
    that overflows only sends finite data down the exact slow path.
    """
    finite = torch.isfinite(torch.stack([q.sum() for q in qs])).tolist()
    return [_Clean(q, None) if ok else _clean(q) for q, ok in zip(qs, finite)]


def _owner_mask(owner: Tensor, groups: int) -> Tensor:
    """[M] group index (-1 = none) -> [M, groups] bool: the one group each row uses."""
    return owner[:, None] == torch.arange(groups, device=owner.device)[None, :]


def _mark(p: Tensor, mark: Tensor) -> Tensor:
    """p [M, G*g] with NaN in the blocks (m, G) where mark [M, G] is set."""
    M, G = mark.shape
    return torch.where(mark[:, :, None], _NAN, p.reshape(M, G, p.shape[1] // G)).reshape(p.shape)


def _expand_isolated(p: Tensor, q: _Clean, uses: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """p [M, G*g] @ q [G*g, N] (added into `out` if given), where row m of p is zero outside the row groups of
    q that uses [M, G] marks.

    A plain GEMM would give every row the NaN of any non-finite entry of q (0 * inf). Here the GEMM runs on
    the zeroed q, and a row that uses a group holding a fault gets NaN in that group's block of p instead,
    so only its own output row turns NaN. p is the small rank-space operand: marking it is cheap.
    """
    if q.bad_rows is not None:
        G = uses.shape[1]
        bad_groups = q.bad_rows.reshape(G, q.bad_rows.shape[0] // G).any(1)  # [G]
        p = _mark(p, uses & bad_groups[None, :])
    return p @ q.value if out is None else out.addmm_(p, q.value)


def _reduce_isolated(p: Tensor, q: _Clean, uses: Tensor) -> Tensor:
    """p [M, G*g]^T @ q [M, N] -> [G*g, N]: the reduction over rows m (tokens), each using the groups marked
    in uses [M, G]. A non-finite q[m] turns NaN only the gradient rows of the groups that row m uses."""
    if q.bad_rows is not None:
        p = _mark(p, uses & q.bad_rows[:, None])
    return p.t() @ q.value


# ------------------------------------------------------------------------------------------ expert term
def _expert_operands(p_expert_a: Tensor, p_expert_b: Tensor, acc):
    """a [K*r_e, d_in] (row block k = A_k) and b [K*r_e, d_out] (row block k = B_k^T), in acc."""
    K, r_e, d_in = p_expert_a.shape
    a = p_expert_a.to(acc).reshape(K * r_e, d_in)
    b = p_expert_b.to(acc).transpose(1, 2).reshape(K * r_e, p_expert_b.shape[1])
    return a, b


def expert_delta(x: Tensor, expert_a: Tensor, expert_b: Tensor, gates: Tensor, expert_scale: float) -> Tensor:
    """s_e * sum_k gates[t,k] B_k A_k x[t], in the accumulation dtype.  # [T, d_out]"""
    acc = _acc_dtype(x)
    T = x.shape[0]
    K, r_e, _ = expert_a.shape
    sel = gates != 0                                                        # [T, K] selected experts
    g = torch.where(sel, gates.to(acc), 0.0) * expert_scale                 # structural zeros: no gradient
    a, b = _expert_operands(expert_a, expert_b, acc)
    h = (x.to(acc) @ a.t()).reshape(T, K, r_e)                              # [T, K, r_e] wide shrink
    h = torch.where(sel[..., None], h * g[..., None], 0.0)                  # gating in rank space
    return _expand_isolated(h.reshape(T, K * r_e), _clean(b), sel)          # [T, d_out] one expand


# -------------------------------------------------------------------------------------------- user term
def _no_user_term(p: Problem) -> bool:
    """U = 0 users or r_max = 0: the user term is zero (shapes alone decide, no sync)."""
    return p.user_a.shape[0] == 0 or p.user_a.shape[1] == 0


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
    return a.reshape(n * r_max, a.shape[-1]), b.reshape(n * r_max, b.shape[-1])


def _own_block(wide, inv, r_max):
    """[T, n*r] -> [T, r]: each token's own user's block."""
    T = wide.shape[0]
    return wide.view(T, -1, r_max).gather(1, inv.view(T, 1, 1).expand(T, 1, r_max)).squeeze(1)


def _spread(h, inv, n):
    """[T, r] -> [T, n*r]: h placed in each token's own user's block, zeros elsewhere."""
    T, r_max = h.shape
    z = h.new_zeros(T, n, r_max)
    return z.scatter_(1, inv.view(T, 1, 1).expand(T, 1, r_max), h.unsqueeze(1)).view(T, n * r_max)


def _dense_plan(p: Problem, uid, valid, strategy: str):
    """(uniq, inv, owner) when the dense strategy is used, else None. strategy: "auto" | "dense" | "gather".

    owner [T]: each token's block in the stack, -1 for tokens without a user (their uid is clamped to 0).
    """
    if strategy == "gather":
        return None
    uniq, inv = torch.unique(uid, return_inverse=True)                     # host sync: torch backend only
    if strategy == "auto" and uniq.numel() * p.user_a.shape[1] > DENSE_MAX_WIDTH:
        return None
    return uniq, inv, torch.where(valid, inv, -1)


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
    if p.has_users and _no_user_term(p):
        y = y + p.user_a.sum() + p.user_b.sum()  # no elements: adds exactly 0, keeps autograd's graph whole
    elif p.has_users:
        coef, uid, valid = _user_coef(p.user_ids, p.user_scale, p.user_weight, p.x.shape[0], acc, p.x.device)
        plan = _dense_plan(p, uid, valid, strategy)
        if plan is None:
            y = y + user_delta(p.x, p.user_a, p.user_b, p.user_ids, p.user_ranks, p.user_scale, p.user_weight)
        else:
            uniq, inv, owner = plan
            n, r_max = uniq.numel(), p.user_a.shape[1]
            a, b = _present_users(p.user_a, p.user_b, uniq, p.user_ranks, acc)  # [n*r, d_in], [n*r, d_out]
            h = _own_block(p.x.to(acc) @ a.t(), inv, r_max)                       # [T, r] shrink
            h = torch.where(valid[:, None], h * coef[:, None], 0.0)
            y = y + _expand_isolated(_spread(h, inv, n), _clean(b), _owner_mask(owner, n))  # [T, d_out]
    return y.to(p.x.dtype)


def _expert_backward(x, dy, cx: _Clean, cdy: _Clean, dx, p: Problem, needs, acc):
    """(d_expert_a, d_expert_b, d_gates) of the expert term, None where not needed; adds its part into dx."""
    T = x.shape[0]
    K, r_e, d_in = p.expert_a.shape
    sel = p.gates != 0                                                      # [T, K]
    gm = torch.where(sel, p.gates.to(acc), 0.0) * p.expert_scale           # [T, K]
    a, b = _expert_operands(p.expert_a, p.expert_b, acc)                    # [K*r, d_in], [K*r, d_out]
    h = (x @ a.t()).reshape(T, K, r_e)                                      # [T, K, r_e] = A_k x
    dhg = (dy @ b.t()).reshape(T, K, r_e)                                   # [T, K, r_e] = B_k^T dy
    d_ea = d_eb = d_g = None
    if needs[2]:
        hg = torch.where(sel[..., None], h * gm[..., None], 0.0).reshape(T, K * r_e)
        d_eb = _reduce_isolated(hg, cdy, sel).reshape(K, r_e, p.d_out).transpose(1, 2)
    if needs[3]:
        d_g = torch.where(sel, (dhg * h).sum(-1) * p.expert_scale, 0.0)    # [T, K]
    dh = torch.where(sel[..., None], dhg * gm[..., None], 0.0).reshape(T, K * r_e)
    if needs[1]:
        d_ea = _reduce_isolated(dh, cx, sel).reshape(K, r_e, d_in)
    if dx is not None:
        _expand_isolated(dh, _clean(a), sel, out=dx)
    return d_ea, d_eb, d_g


def _user_backward(x, dy, cx: _Clean, cdy: _Clean, dx, p: Problem, needs, strategy, acc):
    """(d_user_a, d_user_b, d_user_weight) of the user term, None where not needed; adds its part into dx."""
    T = x.shape[0]
    U, r_max, d_in = p.user_a.shape
    dev = x.device
    d_ua = torch.zeros(p.user_a.shape, dtype=acc, device=dev) if needs[4] else None
    d_ub = torch.zeros(p.user_b.shape, dtype=acc, device=dev) if needs[5] else None
    d_w = torch.zeros(T, dtype=acc, device=dev) if needs[6] else None
    if _no_user_term(p):
        return d_ua, d_ub, d_w
    coef, uid, valid = _user_coef(p.user_ids, p.user_scale, None, T, acc, dev)  # without w
    w = p.user_weight.to(acc) if p.user_weight is not None else torch.ones(T, dtype=acc, device=dev)
    plan = _dense_plan(p, uid, valid, strategy)
    if plan is not None:
        uniq, inv, owner = plan
        a, b = _present_users(p.user_a, p.user_b, uniq, p.user_ranks, acc)  # [n*r, d_in], [n*r, d_out]
        n = uniq.numel()
        uses = _owner_mask(owner, n)                                         # [T, n]
        keep = valid[:, None]
        h = torch.where(keep, _own_block(x @ a.t(), inv, r_max), 0.0)        # [T, r] = A x
        dhc = torch.where(keep, _own_block(dy @ b.t(), inv, r_max), 0.0)     # [T, r] = B^T dy
        c = (coef * w)[:, None]                                              # [T, 1]
        if d_w is not None:
            d_w = (dhc * h).sum(-1) * coef
        if d_ub is not None:
            d_bn = _reduce_isolated(_spread(h * c, inv, n), cdy, uses).reshape(n, r_max, p.d_out)
            d_ub.index_add_(0, uniq, d_bn.transpose(1, 2))
        dz = _spread(dhc * c, inv, n)                                        # [T, n*r]
        if d_ua is not None:
            d_ua.index_add_(0, uniq, _reduce_isolated(dz, cx, uses).reshape(n, r_max, d_in))
        if dx is not None:
            _expand_isolated(dz, _clean(a), uses, out=dx)
        return d_ua, d_ub, d_w
    for sl, a, b in _user_chunks(x, p.user_a, p.user_b, uid, valid, p.user_ranks, acc):
        # tokens without a user are index_add-ed into user 0's rows (uid is clamped): zero their x and dy so
        # that a NaN there cannot reach user 0's gradients as 0 * nan
        keep = valid[sl, None]
        x_c, dy_c = torch.where(keep, x[sl], 0.0), torch.where(keep, dy[sl], 0.0)
        h = torch.bmm(a, x_c.unsqueeze(-1)).squeeze(-1)                     # [t, r] = A x
        c = (coef[sl] * w[sl])[:, None]                                     # [t, 1]
        dhc = torch.bmm(b.transpose(1, 2), dy_c.unsqueeze(-1)).squeeze(-1)  # [t, r] = B^T dy
        if d_w is not None:
            d_w[sl] = (dhc * h).sum(-1) * coef[sl]
        if d_ub is not None:
            d_ub.index_add_(0, uid[sl], dy_c[:, :, None] * (h * c)[:, None, :])
        dh = dhc * c                                                        # [t, r]
        if d_ua is not None:
            d_ua.index_add_(0, uid[sl], dh[:, :, None] * x_c[:, None, :])
        if dx is not None:
            dx[sl] += torch.bmm(a.transpose(1, 2), dh.unsqueeze(-1)).squeeze(-1)
    return d_ua, d_ub, d_w


def backward(grad_out: Tensor, p: Problem, needs, strategy: str = "auto"):
    """Hand-written gradients of :func:`forward` in GRAD_NAMES order (None where not needed), fp32 accumulation.

    Tests check these against autograd through :func:`forward` (and gradcheck in fp64).
    """
    acc = _acc_dtype(p.x)
    x = p.x.to(acc)
    dy = grad_out.to(acc)                                                   # [T, d_out]
    cx, cdy = _clean_tokens(x, dy)                                          # shared by every token reduction
    dx = torch.zeros_like(x) if needs[0] else None
    d_ea = d_eb = d_g = d_ua = d_ub = d_w = None
    if p.has_experts:
        d_ea, d_eb, d_g = _expert_backward(x, dy, cx, cdy, dx, p, needs, acc)
    if p.has_users:
        d_ua, d_ub, d_w = _user_backward(x, dy, cx, cdy, dx, p, needs, strategy, acc)
    grads = (dx, d_ea, d_eb, d_g, d_ua, d_ub, d_w)
    return tuple(None if (gr is None or not n) else gr.to(t.dtype)
                 for gr, n, t in zip(grads, needs, p.differentiable()))


def unavailable_reason(device: torch.device):
    return None  # plain torch runs wherever torch does
