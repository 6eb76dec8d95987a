"""The ``cpu`` backend: the compiled C++ extension (csrc/cpu), OpenMP + vectorised, fp32/bf16 inputs.

The micro-kernels (AVX-512 with AVX512-BF16, AVX-512, AVX2+FMA or portable) are chosen at run time from what the
CPU supports; ``PROPER_CPU_ISA=avx512bf16|avx512|avx2|generic`` forces one (for tests), and :func:`isa` reports the
one in use. The thread count is torch's (``torch.set_num_threads``); results do not depend on it.
"""
from __future__ import annotations

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
    return bind_forward(p)(p.x, out)


def bind_forward(p: Problem):
    """forward_into with every argument but x converted once (decode calls the same problem on every step)."""
    rest, f = _args(p)[1:], _ext.load().cpu_forward

    def run(x: torch.Tensor, out: torch.Tensor):
        if out.dtype != torch.float32 or not out.is_contiguous():
            return None
        return f(x.contiguous(), *rest, out)

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
