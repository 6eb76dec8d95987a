"""Host launchers for the Triton kernels: metadata, tile sizes and grids.

Grid sizes and tile sizes come from tensor shapes only and the metadata is built by torch ops on the tokens'
device, so nothing here reads a value back to the host: a forward/backward can be captured in a CUDA graph.
Weights are handed to the kernels as [adapter, rank, D] views (B transposed), see kernels.py.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

import triton

from .. import layout
from ..checks import Problem
from . import kernels

NUM_WARPS = 4
# Tests set this to fill the rank-space scratch with NaN: a kernel reading a column it did not write (a padded
# rank, a tile past a user's width) then fails the finiteness check instead of reading a lucky zero.
POISON_SCRATCH = False
# Largest tile along the hidden dims: the shrink's reduction over d (D), the expand's outputs (N), the weight
# gradients' columns (C). Sized for GPUs; the interpreter tests raise them for their widest shapes (speed).
HIDDEN_TILE = {"D": 128, "N": 64, "C": 64}
# Expert weight gradients reduce over every token: past this many tokens per program the reduction is split
# into chunks (a grid axis) whose fp32 partials torch then adds, in a fixed order (deterministic).
WGRAD_SPLIT_TOKENS = 512
WGRAD_MAX_SPLITS = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the kernels store results in. Triton's CPU interpreter casts fp32 -> bf16 by truncation where
    GPUs round to nearest even, so under the interpreter bf16 results are stored in fp32 and rounded by torch."""
    return torch.float32 if (dtype == torch.bfloat16 and _interpreting()) else dtype


def _alloc(shape, dtype: torch.dtype, device, zero: bool = False) -> Tensor:
    make = torch.zeros if zero else torch.empty
    return make(shape, dtype=_store_dtype(dtype), device=device)


def _tile(n: int, lo: int, hi: int) -> int:
    """A power-of-two tile for an extent n, within [lo, hi] (tl.dot needs every tile dim >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _cdiv(a: int, b: int) -> int:
    return max(1, -(-a // b))  # a zero extent still launches one (idle) program


class Meta(NamedTuple):
    """Static sizes and device metadata of one problem, shared by forward and backward launches."""

    T: int
    K: int
    RE: int               # expert rank (>= 1 so kernels may divide by it)
    KR: int               # K * r_e: expert columns of the rank space
    U: int
    RMAX: int             # r_max: user columns of the rank space (each user uses r_u of them)
    block_t: int          # tokens per block of a segment kernel
    lay: layout.TokenLayout
    blocks: layout.BlockTable
    ranks: Optional[Tensor]   # [U] int32 or None (every user has r_max)


def metadata(p: Problem) -> Meta:
    x = p.x
    T = x.shape[0]
    K, r_e = (p.expert_a.shape[0], p.expert_a.shape[1]) if p.has_experts else (0, 0)
    U, RMAX = (p.user_a.shape[0], p.user_a.shape[1]) if p.has_users else (0, 0)
    ids = p.user_ids if p.has_users else torch.full((T,), -1, dtype=torch.int64, device=x.device)
    # Small blocks while segments are short (decode: a few tokens per user); larger for prefill/training.
    block_t = 16 if T <= 512 else 64
    lay = p.token_layout() if p.has_users else layout.token_layout(ids, U)   # the batch's, if given
    blocks = layout.block_table(lay, U, block_t, include_no_user=True)
    ranks = p.user_ranks.to(torch.int32) if (p.has_users and p.user_ranks is not None) else None
    return Meta(T, K, max(r_e, 1), K * r_e, U, RMAX, block_t, lay, blocks, ranks)


def scratch(meta: Meta, device) -> Tensor:
    """Rank-space activations [T, KR + r_max] fp32; columns past a token's width stay unwritten."""
    shape = (meta.T, meta.KR + meta.RMAX)
    if POISON_SCRATCH:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _routing(p: Problem, meta: Meta):
    """Pointers, strides and flags of the per-token routing inputs; x stands in for absent tensors (every
    load from them is masked off)."""
    x = p.x
    g = p.gates if p.has_experts else x
    w = p.user_weight if p.user_weight is not None else x
    tensors = (meta.ranks if meta.ranks is not None else x, g,
               p.user_scale if p.user_scale is not None else x, w)
    strides = (g.stride(0), g.stride(1), w.stride(0))
    flags = dict(HAS_RANKS=meta.ranks is not None, HAS_SCALE=p.user_scale is not None,
                 HAS_WEIGHT=p.user_weight is not None)
    return tensors, strides, flags


def _views(p: Problem, expert: Optional[Tensor], user: Optional[Tensor]):
    """[adapter, rank, D] views of the expert and user weights and their strides; x with zero strides stands
    in for an absent part (its columns are masked off)."""
    def one(t):
        return (p.x, (0, 0, 0)) if t is None else (t, (t.stride(0), t.stride(1), t.stride(2)))
    return one(expert), one(user)


def shrink(src: Tensor, w_e: Optional[Tensor], w_u: Optional[Tensor], p: Problem, meta: Meta,
           gate: bool) -> Tensor:
    """h[t, j] = (c[t, j] if gate else 1) * sum_d src[t, d] W[j, d], W = [w_e; w_u[:r_u]].  # [T, KR+r_max]"""
    D = src.shape[1]
    out = scratch(meta, src.device)
    (e, se), (u, su) = _views(p, w_e, w_u)
    (ranks, g, us, uw), (s_g_t, s_g_k, s_w_t), flags = _routing(p, meta)
    b = meta.blocks
    block_r = _tile(meta.KR + meta.RMAX, 16, 64)
    grid = (b.block_user.shape[0], _cdiv(meta.KR + meta.RMAX, block_r))
    kernels.shrink_kernel[grid](
        src, e, u, out, meta.lay.order, b.block_user, b.block_start, b.block_end, ranks, g, us, uw,
        D, meta.KR, meta.RE, meta.RMAX, meta.U, p.expert_scale,
        src.stride(0), src.stride(1), *se, *su, out.stride(0), s_g_t, s_g_k, s_w_t,
        GATE=gate, F32=_interpreting(), BLOCK_T=meta.block_t, BLOCK_R=block_r, BLOCK_D=_tile(D, 16, HIDDEN_TILE["D"]),
        num_warps=NUM_WARPS, **flags)
    return out


def expand(h: Tensor, w_e: Optional[Tensor], w_u: Optional[Tensor], p: Problem, meta: Meta, gate: bool,
           n: int) -> Tensor:
    """out[t, n] = sum_{j < width} (c[t, j] if gate else 1) h[t, j] W[j, n], in x's dtype.  # [T, n]"""
    out = _alloc((meta.T, n), p.x.dtype, p.x.device)
    (e, se), (u, su) = _views(p, w_e, w_u)
    (ranks, g, us, uw), (s_g_t, s_g_k, s_w_t), flags = _routing(p, meta)
    b = meta.blocks
    block_n = _tile(n, 16, HIDDEN_TILE["N"])
    grid = (b.block_user.shape[0], _cdiv(n, block_n))
    kernels.expand_kernel[grid](
        h, e, u, out, meta.lay.order, b.block_user, b.block_start, b.block_end, ranks, g, us, uw,
        n, meta.KR, meta.RE, meta.RMAX, meta.U, p.expert_scale,
        h.stride(0), *se, *su, out.stride(0), out.stride(1), s_g_t, s_g_k, s_w_t,
        GATE=gate, BLOCK_T=meta.block_t, BLOCK_R=_tile(meta.KR + meta.RMAX, 16, 32), BLOCK_N=block_n,
        num_warps=NUM_WARPS, **flags)
    return out.to(p.x.dtype)


def weight_grad(gbuf: Tensor, m: Tensor, weight: Tensor, p: Problem, meta: Meta, user: bool,
                transposed: bool = False, active: Optional[Tensor] = None) -> Tensor:
    """Gradient of `weight` (its shape and dtype). Experts: dW[k, r, c] = s_e sum_t g[t,k] G[t, k r_e + r] m[t, c];
    users: dW[u, r, c] = s_u[u] sum_{t of u} w[t] G[t, KR + r] m[t, c] for r < r_u, zero elsewhere (padded
    ranks and users without tokens are never written). `transposed`: weight is [., C, rank] (a B)."""
    block_t = 32
    splits = 1 if user else min(WGRAD_MAX_SPLITS, max(1, meta.T // WGRAD_SPLIT_TOKENS))
    chunk = _cdiv(_cdiv(meta.T, splits), block_t) * block_t                  # tokens per split
    splits = _cdiv(meta.T, chunk)
    if splits > 1:                                                           # fp32 partials, added below
        grad = torch.empty((splits, *weight.shape), dtype=torch.float32, device=weight.device)
        out = grad.transpose(2, 3) if transposed else grad                   # [S, adapter, rank, C] view
    else:
        grad = _alloc(weight.shape, weight.dtype, weight.device, zero=user)
        out = (grad.transpose(1, 2) if transposed else grad)[None]           # [1, adapter, rank, C] view
    C = m.shape[1]
    (ranks, g, us, uw), (s_g_t, s_g_k, s_w_t), flags = _routing(p, meta)
    block_c = _tile(C, 16, HIDDEN_TILE["C"])
    if user:
        block_r = _tile(meta.RMAX, 16, 64)
        grid = (active.shape[0], _cdiv(meta.RMAX, block_r), _cdiv(C, block_c))
    else:
        block_r = _tile(meta.KR, 16, 64)
        grid = (_cdiv(meta.KR, block_r), _cdiv(C, block_c), splits)
        active = meta.lay.order  # unused
    kernels.wgrad_kernel[grid](
        gbuf, m, out, meta.lay.order, meta.lay.seg_start, meta.lay.seg_len, active, ranks, g, us, uw,
        meta.T, C, meta.KR, meta.RE, meta.RMAX, p.expert_scale, chunk,
        gbuf.stride(0), m.stride(0), m.stride(1), *out.stride(), s_g_t, s_g_k, s_w_t,
        USER=user, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS, **flags)
    if splits > 1:
        grad = grad.sum(0)
    return grad.to(weight.dtype)


def gate_grads(h: Tensor, dh: Tensor, p: Problem, meta: Meta, need_g: bool, need_w: bool):
    """d(gates) [T, K] in gates' dtype and d(user_weight) [T] in its dtype (None where not needed)."""
    x = p.x
    dg = _alloc(p.gates.shape, p.gates.dtype, x.device) if need_g else None
    dw = _alloc(p.user_weight.shape, p.user_weight.dtype, x.device) if need_w else None
    g = p.gates if p.has_experts else x
    dgt = dg if dg is not None else x
    ids = p.user_ids if p.has_users else x
    dwt = dw if dw is not None else x
    block_t = 64
    kernels.gate_grad_kernel[(_cdiv(meta.T, block_t),)](
        h, dh, g, dgt, ids, meta.ranks if meta.ranks is not None else x,
        p.user_scale if p.user_scale is not None else x, dwt,
        meta.T, meta.K, meta.RE, meta.KR, meta.RMAX, p.expert_scale,
        h.stride(0), g.stride(0), g.stride(1), dgt.stride(0), dgt.stride(-1), ids.stride(0), dwt.stride(0),
        NEED_G=need_g, NEED_W=need_w, HAS_RANKS=meta.ranks is not None, HAS_SCALE=p.user_scale is not None,
        BLOCK_T=block_t, BLOCK_RE=triton.next_power_of_2(meta.RE), BLOCK_RU=_tile(meta.RMAX, 16, 64),
        num_warps=NUM_WARPS)
    return (dg.to(p.gates.dtype) if need_g else None), (dw.to(p.user_weight.dtype) if need_w else None)
