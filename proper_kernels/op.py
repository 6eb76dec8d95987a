"""``routed_lora``: argument checks, backend dispatch, autograd and the ``torch.library`` custom op.

Layering: checks.validate -> autograd (eager: _EagerRoutedLoRA; traced: the custom op proper::routed_lora, its
backward proper::routed_lora_backward) -> backend.forward / backend.backward. Backends are modules with the functions

    unavailable_reason(device) -> str | None     why the backend cannot run on that device (None: it can)
    unsupported_reason(dtype) -> str | None      why it cannot run inputs of that dtype; optional
    forward(problem) -> Tensor [T, d_out]
    backward(grad_out, problem, needs) -> 7 gradients in checks.GRAD_NAMES order (None where not needed)

and optionally

    forward_into(problem, out) -> out | None     adds the delta into `out` in place (None: cannot, for that out)
    bind_forward(problem) -> run(x, out)         the same with every argument but x bound once (prepared.py)
    forward_saving(problem) -> (delta, saved)    also returns what its backward(..., saved=saved) then reads
                                                 instead of recomputing (the cpu backend: A x of every term)

and are imported lazily, so importing proper_kernels never imports Triton or a compiled library.
"""
from __future__ import annotations

import functools
import importlib
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .checks import GRAD_NAMES, Problem, validate
from .layout import TokenLayout

BACKENDS = {
    "torch": "proper_kernels.reference",
    "cpu": "proper_kernels.cpu",
    "triton": "proper_kernels.triton",
    "cuda": "proper_kernels.cuda",
}
# Fastest first, per device type; "torch" runs everywhere.
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


def _backend_module(name: str):
    if name not in BACKENDS:
        raise ValueError(f"routed_lora: argument 'backend' must be one of {['auto', *BACKENDS]}, got {name!r}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:  # e.g. triton not installed
        return _Missing(f"{name} backend cannot be imported: {e}")


class _Missing:
    def __init__(self, reason):
        self.reason = reason

    def unavailable_reason(self, device):
        return self.reason


def _why_not(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    mod = _backend_module(name)
    reason = mod.unavailable_reason(device)
    if reason is None and dtype is not None and hasattr(mod, "unsupported_reason"):
        reason = mod.unsupported_reason(dtype)
    return reason


def available_backends(device="cpu") -> List[str]:
    """Names of the backends that can run on `device` (a torch.device or string), fastest first."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("torch",))
    rest = [n for n in BACKENDS if n not in order]
    return [n for n in (*order, *rest) if _why_not(n, device) is None]


@functools.lru_cache(maxsize=None)
def _resolve(backend: str, device: str, dtype: torch.dtype) -> str:
    device = torch.device(device)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if _why_not(name, device, dtype) is None:
                return name
        return "torch"
    reason = _why_not(backend, device, dtype)
    if reason is not None:
        raise RuntimeError(f"routed_lora: backend {backend!r} is not available for this call: {reason}")
    return backend


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: str, dtype: torch.dtype) -> str:
    """The backend that runs inputs of this device and dtype: the fastest able for "auto", else the one asked.

    Depends only on (backend, device, dtype), so torch.compile evaluates it once while tracing.
    """
    return _resolve(backend, device, dtype)


# ----------------------------------------------------------------------------------------------- custom op
def _problem(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, expert_scale, user_scale,
             user_weight, order=None, seg_start=None, seg_len=None) -> Problem:
    d_out = expert_b.shape[1] if expert_b is not None else user_b.shape[1]
    lay = TokenLayout(order, seg_start, seg_len) if order is not None else None
    return Problem(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, expert_scale,
                   user_scale, user_weight, d_out, lay)


@torch.library.custom_op("proper::routed_lora", mutates_args=())
def _routed_lora_op(x: Tensor, expert_a: Optional[Tensor], expert_b: Optional[Tensor], gates: Optional[Tensor],
                    user_a: Optional[Tensor], user_b: Optional[Tensor], user_ids: Optional[Tensor],
                    user_ranks: Optional[Tensor], expert_scale: float, user_scale: Optional[Tensor],
                    user_weight: Optional[Tensor], backend: str, order: Optional[Tensor] = None,
                    seg_start: Optional[Tensor] = None, seg_len: Optional[Tensor] = None) -> Tensor:
    return _forward(_problem(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, expert_scale,
                             user_scale, user_weight, order, seg_start, seg_len), backend)


def _forward(p: Problem, backend: str) -> Tensor:
    """The op's forward body (the custom op, and the direct no-grad path of routed_lora)."""
    if p.x.shape[0] == 0:
        return p.x.new_zeros((0, p.d_out))
    return _backend_module(backend).forward(p).contiguous()


def _direct(p: Problem) -> bool:
    """Whether routed_lora may call the backend without the custom op: nothing to differentiate, no tracing (
    torch.compile, fake or meta tensors need the op and its fake impl). The dispatch it skips costs about as much
    as a decode-sized kernel (benchmarks/bench_layer_overhead.py)."""
    if torch.compiler.is_compiling() or p.x.device.type == "meta" or type(p.x) is not torch.Tensor:
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in p.differentiable())


@_routed_lora_op.register_fake
def _(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, expert_scale, user_scale, user_weight,
      backend, order=None, seg_start=None, seg_len=None):
    d_out = expert_b.shape[1] if expert_b is not None else user_b.shape[1]
    return x.new_empty((x.shape[0], d_out))


@torch.library.custom_op("proper::routed_lora_backward", mutates_args=())
def _routed_lora_backward_op(grad_out: Tensor, x: Tensor, expert_a: Optional[Tensor], expert_b: Optional[Tensor],
                             gates: Optional[Tensor], user_a: Optional[Tensor], user_b: Optional[Tensor],
                             user_ids: Optional[Tensor], user_ranks: Optional[Tensor], expert_scale: float,
                             user_scale: Optional[Tensor], user_weight: Optional[Tensor], backend: str,
                             needs: List[bool], order: Optional[Tensor] = None, seg_start: Optional[Tensor] = None,
                             seg_len: Optional[Tensor] = None) -> List[Tensor]:
    p = _problem(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, expert_scale, user_scale,
                 user_weight, order, seg_start, seg_len)
    grads = _grads(grad_out, p, needs, backend, None)
    # A custom op returns tensors only: empty placeholders stand for "no gradient".
    return [g if g is not None else x.new_empty(0) for g in grads]


def _grads(grad_out: Tensor, p: Problem, needs, backend: str, saved: Optional[Tensor]) -> List[Optional[Tensor]]:
    """The backward body (the custom backward op, and the eager autograd.Function): the 7 gradients in GRAD_NAMES
    order, None where not needed. ``saved``: what the backend's forward_saving returned, or None."""
    inputs = p.differentiable()
    needs = [bool(n) and t is not None for n, t in zip(needs, inputs)]
    if p.x.shape[0] == 0 or not any(needs):
        return [torch.zeros_like(t) if n else None for t, n in zip(inputs, needs)]
    extra = {} if saved is None else {"saved": saved}   # from the forward of a training step
    grads = _backend_module(backend).backward(grad_out.contiguous(), p, tuple(needs), **extra)
    return [g.contiguous() if n else None for g, n in zip(grads, needs)]


@_routed_lora_backward_op.register_fake
def _(grad_out, x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, expert_scale, user_scale,
      user_weight, backend, needs, order=None, seg_start=None, seg_len=None):
    inputs = (x, expert_a, expert_b, gates, user_a, user_b, user_weight)
    return [t.new_empty(t.shape) if (n and t is not None) else x.new_empty(0) for t, n in zip(inputs, needs)]


def _setup_context(ctx, inputs, output):
    # the layout (inputs 12-14) is saved too: the backward reuses the forward's, never rebuilds it
    ctx.save_for_backward(*inputs[:8], inputs[9], inputs[10], *inputs[12:15])
    ctx.expert_scale = inputs[8]
    ctx.backend = inputs[11]


def _backward(ctx, grad_out):
    (x, ea, eb, g, ua, ub, ids, ranks, us, uw, order, seg_start, seg_len) = ctx.saved_tensors
    needs = [bool(n) for n in (ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4, 5, 10))]
    grads = torch.ops.proper.routed_lora_backward(grad_out, x, ea, eb, g, ua, ub, ids, ranks, ctx.expert_scale,
                                                  us, uw, ctx.backend, needs, order, seg_start, seg_len)
    gx, gea, geb, gg, gua, gub, guw = [gr if n else None for gr, n in zip(grads, needs)]
    return gx, gea, geb, gg, gua, gub, None, None, None, None, guw, None, None, None, None


_routed_lora_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public API
def routed_lora(x: Tensor, expert_a: Optional[Tensor], expert_b: Optional[Tensor], gates: Optional[Tensor],
                user_a: Optional[Tensor], user_b: Optional[Tensor], user_ids: Optional[Tensor], *,
                user_ranks: Optional[Tensor] = None, expert_scale: float = 1.0, user_scale=None,
                user_weight: Optional[Tensor] = None, out: Optional[Tensor] = None, backend: str = "auto",
                check_values: bool = True, layout: Optional[TokenLayout] = None) -> Tensor:
    """Routed multi-LoRA delta for a batch of tokens from many users.

    Semantics, for every token t with u = user_ids[t]:

        delta[t] = s_e * sum_k gates[t,k] * B_k (A_k x[t])
                 + [u >= 0] * w[t] * s_u[u] * B_u[:, :r_u] (A_u[:r_u] x[t])

    Shapes: x [T, d_in]; expert_a [K, r_e, d_in]; expert_b [K, d_out, r_e]; gates [T, K]; user_a
    [U, r_max, d_in]; user_b [U, d_out, r_max]; user_ids [T] (-1 = no user); user_ranks [U]; user_scale float or
    [U]; user_weight [T]. Either part may be None. Zero gates are structural (no term, no gradient); padded rank
    rows are never read; a NaN/Inf in one adapter stays in the rows of the tokens that use it (reference.py).
    Accumulates in fp32; returns x's dtype. With ``out`` the delta is added into it in place and ``out`` is
    returned. ``backend``: "auto" | "torch" | "cpu" | "triton" | "cuda".
    ``check_values=False`` skips the value checks that need a host sync (ids and ranks in range).
    ``layout``: ``token_layout(user_ids, U)`` built once per batch and shared by every layer (the model layer's
    user context does this); segment backends (triton, cuda) then neither sort nor count again, forward or
    backward. Without it they build their own.
    Differentiable w.r.t. x, expert_a, expert_b, gates, user_a, user_b and user_weight.
    """
    check_values = check_values and not torch.compiler.is_compiling()
    p = validate(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks=user_ranks,
                 expert_scale=expert_scale, user_scale=user_scale, user_weight=user_weight, out=out,
                 check_values=check_values, layout=layout)
    if not (p.has_experts or p.has_users):  # K = 0 experts and no users: the delta is zero
        return out if out is not None else x.new_zeros((x.shape[0], p.d_out))
    name = resolve_backend(backend, str(x.device), x.dtype)
    if _direct(p):
        if out is not None and x.shape[0]:
            into = getattr(_backend_module(name), "forward_into", None)   # adds into out itself, if it can
            done = into(p, out) if into is not None else None
            if done is not None:
                return done
        delta = _forward(p, name)
    else:
        delta = _op_call(p, name)
    if out is not None:
        return out.add_(delta)
    return delta


def _op_call(p: Problem, backend: str) -> Tensor:
    """The delta with autograd. Traced (torch.compile, fake / meta tensors, subclasses): through the custom op. In
    eager autograd: through _EagerRoutedLoRA, which calls the same backend functions without the custom op's
    Python dispatch (about 150 us a layer call, forward and backward, more than the kernel of a small batch); on a
    backend that can keep A x for its backward (``forward_saving``) and a backward that needs it (a gradient of B,
    gates or user_weight), its forward saves A x."""
    if _eager(p):
        return _EagerRoutedLoRA.apply(p.x, p.expert_a, p.expert_b, p.gates, p.user_a, p.user_b, p.user_weight,
                                      p, backend, _saves(p, backend))
    lay = p.layout if p.layout is not None else (None, None, None)
    return torch.ops.proper.routed_lora(p.x, p.expert_a, p.expert_b, p.gates, p.user_a, p.user_b, p.user_ids,
                                        p.user_ranks, p.expert_scale, p.user_scale, p.user_weight, backend, *lay)


def _eager(p: Problem) -> bool:
    """Plain eager autograd: not tracing, real tensors, no torch.func transform (those need the custom op)."""
    if torch.compiler.is_compiling() or type(p.x) is not torch.Tensor or p.x.device.type == "meta":
        return False
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return not (active is not None and active())


def _saves(p: Problem, backend: str) -> bool:
    """Whether the forward keeps A x for the backward: the backend can, and the backward will read it."""
    if not hasattr(_backend_module(backend), "forward_saving") or p.x.shape[0] == 0:
        return False
    return any(t is not None and t.requires_grad for t in (p.expert_b, p.gates, p.user_b, p.user_weight))


class _EagerRoutedLoRA(torch.autograd.Function):
    """Eager autograd for routed_lora: the custom op's forward and backward bodies (_forward / forward_saving,
    _grads), called directly. Inputs: the 7 differentiable tensors (None where absent), then the validated
    Problem (its tensors are the same objects), the backend name and whether to save A x."""

    @staticmethod
    def forward(ctx, x, expert_a, expert_b, gates, user_a, user_b, user_weight, p: Problem, backend: str,
                save: bool):
        saved = None
        if save:
            delta, saved = _backend_module(backend).forward_saving(p)
            delta = delta.contiguous()
        else:
            delta = _forward(p, backend)
        lay = p.layout if p.layout is not None else (None, None, None)
        # tensors through save_for_backward (version checks, saved-tensor hooks); the rest of p by reference
        ctx.save_for_backward(x, expert_a, expert_b, gates, user_a, user_b, p.user_ids, p.user_ranks, p.user_scale,
                              user_weight, *lay, saved)
        ctx.expert_scale, ctx.backend = p.expert_scale, backend
        return delta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        *args, saved = ctx.saved_tensors   # _problem's tensors in its order (layout last), then saved
        p = _problem(*args[:8], ctx.expert_scale, *args[8:])
        grads = _grads(grad_out, p, ctx.needs_input_grad[:7], ctx.backend, saved)
        return (*grads, None, None, None)


def routed_lora_reference(x, expert_a, expert_b, gates, user_a, user_b, user_ids, **kwargs) -> Tensor:
    """The reference semantics as plain differentiable torch ops (no custom op): the oracle for tests."""
    from . import reference

    out = kwargs.pop("out", None)
    p = validate(x, expert_a, expert_b, gates, user_a, user_b, user_ids, out=out, **kwargs)
    delta = reference.forward(p, strategy="gather")
    return out.add_(delta) if out is not None else delta


__all__: Sequence[str] = ("routed_lora", "routed_lora_reference", "available_backends", "resolve_backend",
                          "BACKENDS", "GRAD_NAMES")
