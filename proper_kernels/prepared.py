"""``prepare_routed_lora``: routed_lora with every argument but ``x`` checked and bound once.

A model layer calls the op with the same adapters, gates, ids and layout for every decode step of a batch; only
``x`` changes. Checking, normalising and dispatching those arguments again on each of the ~200 layer calls of a
step costs more than a decode-sized kernel (benchmarks/bench_layer_overhead.py). A prepared call does it once:

    call = prepare_routed_lora(x, expert_a, expert_b, gates, user_a, user_b, user_ids, **same kwargs as routed_lora)
    call(x2, out=y)        # x2: same shape, dtype and device as x; y += delta, as routed_lora(x2, ..., out=y)

``x`` may have leading dims ([B, S, d_in], a layer's input): its T = B * S tokens are routed_lora's rows and
``out`` is then [B, S, d_out] (or any shape of T * d_out elements ending in d_out).

Semantics: exactly ``routed_lora`` (same backends, same results). The bound tensors are held by reference, so
in-place updates (optimizer steps, ``load_state_dict``, ``copy_``) are seen; a tensor *replaced* by a new one
is not, so build a new call after that. With gradients needed the call goes through the custom op (autograd,
torch.compile), skipping only the argument checks.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .checks import Problem, validate
from .op import _backend_module, _direct, _forward, _op_call, resolve_backend


class PreparedRoutedLoRA:
    """One routed_lora problem with ``x`` left open; see the module docstring."""

    __slots__ = ("problem", "backend", "_shape", "_dtype", "_device", "_run", "_empty")

    def __init__(self, problem: Problem, backend: str, x_shape: torch.Size):
        self.problem, self.backend = problem, backend
        self._shape, self._dtype, self._device = x_shape, problem.x.dtype, problem.x.device
        self._empty = not (problem.has_experts or problem.has_users) or problem.x.shape[0] == 0
        bind = getattr(_backend_module(backend), "bind_forward", None)
        # bind_forward(problem) -> run(x, out): adds the delta into out and returns it, or None when the backend
        # cannot add into that out (then the generic path below adds a fresh delta)
        self._run: Optional[Callable[[Tensor, Tensor], Optional[Tensor]]] = (
            bind(problem) if bind is not None else None)

    def __call__(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if x.shape != self._shape or x.dtype != self._dtype or x.device != self._device:
            raise ValueError(f"prepared routed_lora: argument 'x' must have the shape {tuple(self._shape)}, dtype "
                             f"{self._dtype} and device {self._device} it was prepared with, got shape "
                             f"{tuple(x.shape)}, dtype {x.dtype}, device {x.device}")
        T, d_out = self.problem.x.shape[0], self.problem.d_out
        if out is not None and (out.numel() != T * d_out or out.shape[-1] != d_out or out.device != self._device):
            raise ValueError(f"prepared routed_lora: argument 'out' must hold [{T}, {d_out}] (leading dims allowed) "
                             f"on {self._device}, got shape {tuple(out.shape)} on {out.device}")
        if self._empty:
            return out if out is not None else x.new_zeros(self._shape[:-1] + (d_out,))
        # the decode path: nothing to differentiate or trace, and a backend that adds into out itself
        if (self._run is not None and out is not None and not torch.is_grad_enabled() and type(x) is Tensor
                and not torch.compiler.is_compiling()):
            done = self._run(x, out)
            if done is not None:
                return done
        p = self.problem._replace(x=x.reshape(T, x.shape[-1]))
        delta = _forward(p, self.backend) if _direct(p) else _op_call(p, self.backend)
        if out is not None:
            return out.add_(delta.view(out.shape))
        return delta.view(self._shape[:-1] + (d_out,))


def prepare_routed_lora(x: Tensor, expert_a: Optional[Tensor], expert_b: Optional[Tensor], gates: Optional[Tensor],
                        user_a: Optional[Tensor], user_b: Optional[Tensor], user_ids: Optional[Tensor], *,
                        user_ranks: Optional[Tensor] = None, expert_scale: float = 1.0, user_scale=None,
                        user_weight: Optional[Tensor] = None, backend: str = "auto", check_values: bool = True,
                        layout=None) -> PreparedRoutedLoRA:
    """Check every argument of ``routed_lora`` once (with ``x`` as the example of the inputs to come) and return
    the bound call. Errors are routed_lora's, raised here."""
    check_values = check_values and not torch.compiler.is_compiling()
    x_shape = x.shape
    if x.dim() != 2 and isinstance(x, Tensor) and x.dim() >= 1:
        x = x.reshape(-1, x.shape[-1])
    p = validate(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks=user_ranks,
                 expert_scale=expert_scale, user_scale=user_scale, user_weight=user_weight,
                 check_values=check_values, layout=layout)
    return PreparedRoutedLoRA(p, resolve_backend(backend, str(x.device), x.dtype), x_shape)
