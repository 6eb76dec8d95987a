"""The ``triton`` backend: Triton forward and backward kernels (GPU; CPU only under TRITON_INTERPRET=1).

Layers: kernels.py (the @triton.jit kernels) <- launch.py (metadata, tiles, grids) <- this module (the
backend protocol of op.py). Triton is imported lazily: importing proper_kernels never imports it.

Forward:  h = gated shrink of x over [A_1..A_K | A_u]  ->  y = expand of h over [B_1..B_K | B_u].
Backward: h = A x and dh = B^T dy (ungated shrinks), then d(gates), d(user_weight) from h * dh; dx = expand
of gated dh over A; dB = dy^T (gated h) and dA = (gated dh)^T x, per expert over all tokens and per user over
that user's segment. Faults stay where they belong (reference.py's Semantics): see kernels.py.
"""
from __future__ import annotations

import os

import torch


def unavailable_reason(device):
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's interpreter: tests only, slow
    return (f"the triton backend runs on CUDA tensors (on CPU only with TRITON_INTERPRET=1 set before triton "
            f"is imported), got device {device}")


def unsupported_reason(dtype):
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the triton backend supports float32, bfloat16 and float16 inputs, got {dtype}"
    return None


def forward(p):
    from . import launch

    meta = launch.metadata(p)
    ea = p.expert_a                                                   # [K, r_e, d_in]
    eb = p.expert_b.transpose(1, 2) if p.has_experts else None        # [K, r_e, d_out] view
    ua = p.user_a                                                     # [U, r_max, d_in]
    ub = p.user_b.transpose(1, 2) if p.has_users else None            # [U, r_max, d_out] view
    h = launch.shrink(p.x, ea, ua, p, meta, gate=True)                # [T, KR + r_max] fp32, gated
    return launch.expand(h, eb, ub, p, meta, gate=False, n=p.d_out)   # [T, d_out]


def backward(grad_out, p, needs):
    from . import launch

    need_dx, need_ea, need_eb, need_g, need_ua, need_ub, need_w = needs
    meta = launch.metadata(p)
    x, dy = p.x, grad_out                                             # [T, d_in], [T, d_out]
    ea, ua = p.expert_a, p.user_a
    eb = p.expert_b.transpose(1, 2) if p.has_experts else None        # [K, r_e, d_out] view
    ub = p.user_b.transpose(1, 2) if p.has_users else None            # [U, r_max, d_out] view

    h = dh = None
    if need_eb or need_ub or need_g or need_w:
        h = launch.shrink(x, ea, ua, p, meta, gate=False)             # [T, KR + r_max] = [A_e; A_u] x
    if need_dx or need_ea or need_ua or need_g or need_w:
        dh = launch.shrink(dy, eb, ub, p, meta, gate=False)           # [T, KR + r_max] = [B_e | B_u]^T dy

    dx = launch.expand(dh, ea, ua, p, meta, gate=True, n=x.shape[1]) if need_dx else None
    d_g = d_w = None
    if need_g or need_w:
        d_g, d_w = launch.gate_grads(h, dh, p, meta, need_g, need_w)

    d_ea = d_eb = d_ua = d_ub = None
    if need_ea:
        d_ea = launch.weight_grad(dh, x, ea, p, meta, user=False)                      # (gated dh)^T x
    if need_eb:
        d_eb = launch.weight_grad(h, dy, p.expert_b, p, meta, user=False, transposed=True)  # dy^T (gated h)
    if need_ua or need_ub:
        active = layout_users(meta)
        if need_ua:
            d_ua = launch.weight_grad(dh, x, ua, p, meta, user=True, active=active)
        if need_ub:
            d_ub = launch.weight_grad(h, dy, p.user_b, p, meta, user=True, transposed=True, active=active)
    return dx, d_ea, d_eb, d_g, d_ua, d_ub, d_w


def layout_users(meta):
    """Users with tokens in this batch (static length min(T, U)): the rows of the per-user reductions."""
    from .. import layout

    return layout.active_users(meta.lay, meta.U)
