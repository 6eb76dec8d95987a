"""The ``cpu`` backend: the compiled C++ extension (csrc/cpu), OpenMP + vectorised, fp32/bf16 inputs.

The micro-kernels (AVX-512 with AVX512-BF16, AVX-512, AVX2+FMA or portable) are chosen at run time from what the
CPU supports; ``PROPER_CPU_ISA=avx512bf16|avx512|avx2|generic`` forces one (for tests), and :func:`isa` reports the
one in use. The thread count is torch's (``torch.set_num_threads``); results do not depend on it.
"""
from __future__ import annotations

import weakref

import torch

from . import _ext
from .checks import Problem


def unavailable_reason(device: torch.device):
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got device {device}"
    if not _ext.has("cpu_forward"):
        return _ext.load_error() or "the compiled extension has no CPU kernels"
    return None


def unsupported_reason(dtype: torch.dtype):
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the cpu backend supports float32 and bfloat16, got {dtype}"
    return None


def isa() -> str:
    """The micro-kernel instruction set in use: "avx512bf16" (AVX-512, bf16 products with vdpbf16ps), "avx512",
    "avx2" or "generic"."""
    return _ext.load().cpu_isa()


def set_isa(name: str) -> str:
    """Select the micro-kernels ("auto", "avx512bf16", "avx512", "avx2", "generic"); raises if this CPU cannot run
    them."""
    return _ext.load().cpu_set_isa(name)


def supported_isas():
    return list(_ext.load().cpu_supported_isas())


def _c(t):
    return None if t is None else t.contiguous()


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _i64(t):
    return None if t is None else t.to(torch.int64).contiguous()


def _args(p: Problem):
    """The problem as the extension takes it: contiguous tensors, fp32 gates / weights, int64 ids / ranks."""
    return (_c(p.x), _c(p.expert_a), _c(p.expert_b), _f32(p.gates), _c(p.user_a), _c(p.user_b), _i64(p.user_ids),
            _i64(p.user_ranks), float(p.expert_scale), _f32(p.user_scale), _f32(p.user_weight), int(p.d_out))


def forward(p: Problem) -> torch.Tensor:
    return _ext.load().cpu_forward(*_args(p))


def forward_into(p: Problem, out: torch.Tensor):
    """out += delta, added by the extension itself (no Python-level add) for a contiguous fp32 out; else None."""
    return bind_forward(p, pack_experts=False)(p.x, out)   # one call: packing B once would not pay


# The experts' B packed for the expand (B_k^T per block), shared by the bound calls of one expert_b (a layer's
# prefill and decode calls): id(expert_b) -> (a weak reference to expert_b, its data_ptr and version when packed,
# a weak reference to the packed copy). The bound calls hold the copy itself, so it lives as long as they do.
_expert_bt_cache: dict = {}


def _expert_bt(b: torch.Tensor) -> torch.Tensor:
    """expert_b [K, d_out, R] as the extension's expand reads it (B_k^T per block of output columns, flat): the
    experts' expand streams it as it is instead of packing a block in every call (a decode step gives each expert a
    few tokens)."""
    key = id(b)
    hit = _expert_bt_cache.get(key)
    if hit is not None:
        ref, ptr, ver, bt_ref = hit
        bt = bt_ref()
        if ref() is b and ptr == b.data_ptr() and ver == b._version and bt is not None:
            return bt
    bt = _ext.load().cpu_pack_expert_bt(b)
    _expert_bt_cache[key] = (weakref.ref(b, lambda _r, k=key: _expert_bt_cache.pop(k, None)), b.data_ptr(),
                             b._version, weakref.ref(bt))
    return bt


def bind_forward(p: Problem, pack_experts: bool = True):
    """forward_into with every argument but x converted once (decode calls the same problem on every step). With
    experts, their B is also bound packed (B_k^T per block, read as it is by the expand, no packing per call); an
    in-place update of expert_b (its version changes) packs it again on the next call. pack_experts=False leaves
    the packing to every call (the same bits; an ablation for benchmarks)."""
    rest, f = _args(p)[1:], _ext.load().cpu_forward
    eb = rest[1]
    state = [_expert_bt(eb), eb._version] if pack_experts and eb is not None and eb.shape[0] > 0 else None

    def run(x: torch.Tensor, out: torch.Tensor):
        if out.dtype != torch.float32 or not out.is_contiguous():
            return None
        if state is None:
            return f(x.contiguous(), *rest, out)
        if state[1] != eb._version:
            state[0], state[1] = _expert_bt(eb), eb._version
        return f(x.contiguous(), *rest, out, state[0])

    return run


def forward_saving(p: Problem):
    """(delta, saved): the forward of a training step, plus A x of every (token, adapter) term ([n] fp32), which
    ``backward(..., saved=saved)`` reads instead of recomputing it (one of its five rank-r products)."""
    return tuple(_ext.load().cpu_forward_saving(*_args(p)))


def backward(grad_out: torch.Tensor, p: Problem, needs, saved=None):
    grad_out = grad_out.to(p.x.dtype).contiguous()
    grads = _ext.load().cpu_backward(grad_out, *_args(p), [bool(n) for n in needs], saved)
    # d(gates) and d(user_weight) come back in fp32; every gradient takes its input's dtype
    return tuple(None if (g is None or not n) else (g if g.dtype == t.dtype else g.to(t.dtype))
                 for g, n, t in zip(grads, needs, p.differentiable()))
