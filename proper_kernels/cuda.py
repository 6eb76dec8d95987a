"""The ``cuda`` backend: the compiled CUDA kernels (csrc/cuda), SGMV-style, sm_80+.

The kernels (csrc/cuda/*.cu, host API in csrc/cuda/routed_lora.cuh) run through the binding csrc/cuda_binding.cpp
as ``_C.cuda_forward`` / ``_C.cuda_backward``. This module only prepares their arguments:

- contiguous tensors; gates, per-user scales and user weights in fp32; user ids and ranks in int32;
- the token -> user layout, built on the tokens' device with no host sync (a CUDA graph can capture the whole
  call): tokens argsorted by user with the no-user tokens last, per-user segment lengths by ``scatter_add_``
  (``torch.bincount`` would sync on CUDA), and :func:`proper_kernels.layout.block_table` over the U + 1
  segments (segment U = tokens without a user), so every token belongs to exactly one block. The backward adds
  a coarser table of the same form for the per-user weight-gradient reductions.

Gradients come back in the inputs' dtypes (d(gates) and d(user_weight) are computed in fp32 and cast here).
"""
from __future__ import annotations

import torch

from . import _ext
from .layout import TokenLayout, block_table

# Token blocks of the segment tables (the binding exports the values the kernels were tuned for).
_BLOCK_TOKENS = 16
_REDUCE_BLOCK_TOKENS = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests point this at a build of the same binding over the host emulator (csrc/cuda/host_emu); None = _C.
_module_override = None


def _lib():
    return _module_override if _module_override is not None else _ext.load()


def unavailable_reason(device: torch.device):
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got device {device}"
    if not _ext.has("cuda_forward"):
        return _ext.load_error() or "the extension was built without CUDA (torch.version.cuda was not set)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the cuda kernels need compute capability 8.0 or newer (sm_80+), got {major}.{minor}"
    return None


def unsupported_reason(dtype: torch.dtype):
    if dtype not in _DTYPES:
        return f"the cuda backend supports float32, float16 and bfloat16, got {dtype}"
    return None


def _tables(layout: TokenLayout, num_users: int, block: int):
    """(user, start, end) int32 block table over all U + 1 segments: user == U marks the no-user tokens."""
    bt = block_table(layout, num_users + 1, block)
    return bt.block_user.int().contiguous(), bt.block_start.int().contiguous(), bt.block_end.int().contiguous()


def _block_sizes(lib):
    return (getattr(lib, "cuda_block_tokens", _BLOCK_TOKENS),
            getattr(lib, "cuda_reduce_block_tokens", _REDUCE_BLOCK_TOKENS))


def _args(p, lib, reduce_table: bool):
    """Positional arguments shared by cuda_forward and cuda_backward (plus the coarse table when asked)."""
    x = p.x.contiguous()
    ea = eb = gates = None
    if p.has_experts:
        ea, eb = p.expert_a.contiguous(), p.expert_b.contiguous()
        gates = p.gates.to(torch.float32).contiguous()
    ua = ub = ids = ranks = scale = weight = None
    order = fine = coarse = None
    if p.has_users:
        ua, ub = p.user_a.contiguous(), p.user_b.contiguous()
        ids = p.user_ids.to(torch.int32).contiguous()
        if p.user_ranks is not None:
            ranks = p.user_ranks.to(torch.int32).contiguous()
        if p.user_scale is not None:
            scale = p.user_scale.to(torch.float32).contiguous()
        if p.user_weight is not None:
            weight = p.user_weight.to(torch.float32).contiguous()
        U = p.num_users
        block, red_block = _block_sizes(lib)
        layout = p.token_layout()   # the batch's, when the caller built it once
        order = layout.order.int().contiguous()
        fine = _tables(layout, U, block)
        if reduce_table:
            coarse = _tables(layout, U, red_block)
    fine = fine or (None, None, None)
    coarse = coarse or (None, None, None)
    return [x, ea, eb, gates, ua, ub, ids, ranks, float(p.expert_scale), scale, weight, order, *fine], coarse


def forward(p):
    lib = _lib()
    args, _ = _args(p, lib, reduce_table=False)
    return lib.cuda_forward(*args)


def backward(grad_out, p, needs):
    lib = _lib()
    needs = [bool(n) for n in needs]
    args, coarse = _args(p, lib, reduce_table=needs[4] or needs[5])
    grad_out = grad_out.to(p.x.dtype).contiguous()
    grads = list(lib.cuda_backward(grad_out, *args, *coarse, needs))
    if grads[3] is not None:
        grads[3] = grads[3].to(p.gates.dtype)
    if grads[6] is not None:
        grads[6] = grads[6].to(p.user_weight.dtype)
    return tuple(g if n else None for g, n in zip(grads, needs))
