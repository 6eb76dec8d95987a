"""Argument checks and normalisation for ``routed_lora``, shared by every backend.

Every backend receives a :class:`Problem`: validated, normalised tensors, so no backend repeats a check and
bad input fails here with an error naming the argument, never deep inside a kernel.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .layout import TokenLayout, token_layout

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Names of the differentiable inputs, in the order backends return their gradients.
GRAD_NAMES = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_weight")


class Problem(NamedTuple):
    """Validated inputs of one ``routed_lora`` call.

    Absent parts are ``None``: no experts -> expert_a/expert_b/gates None; no user adapters -> user_a/user_b/
    user_ids None. ``user_ranks`` is None when every user uses the full ``r_max``; ``user_scale`` is None (all
    ones) or an fp32 ``[U]`` tensor; ``user_weight`` is None (all ones) or ``[T]``.
    """

    x: Tensor                      # [T, d_in]
    expert_a: Optional[Tensor]     # [K, r_e, d_in]
    expert_b: Optional[Tensor]     # [K, d_out, r_e]
    gates: Optional[Tensor]        # [T, K]
    user_a: Optional[Tensor]       # [U, r_max, d_in]
    user_b: Optional[Tensor]       # [U, d_out, r_max]
    user_ids: Optional[Tensor]     # [T] int
    user_ranks: Optional[Tensor]   # [U] int
    expert_scale: float
    user_scale: Optional[Tensor]   # [U] fp32
    user_weight: Optional[Tensor]  # [T]
    d_out: int
    layout: Optional[TokenLayout] = None   # tokens grouped by user, built once per batch by the caller

    def token_layout(self) -> TokenLayout:
        """The caller's layout, or one built now from user_ids (segment kernels need it)."""
        return self.layout if self.layout is not None else token_layout(self.user_ids, self.num_users)

    @property
    def has_experts(self) -> bool:
        return self.expert_a is not None

    @property
    def has_users(self) -> bool:
        return self.user_a is not None

    @property
    def num_users(self) -> int:
        return 0 if self.user_a is None else self.user_a.shape[0]

    def differentiable(self):
        """The seven differentiable inputs, in GRAD_NAMES order (None where absent)."""
        return (self.x, self.expert_a, self.expert_b, self.gates, self.user_a, self.user_b, self.user_weight)


def _fail(name: str, expected: str, got: str, exc=ValueError):
    raise exc(f"routed_lora: argument '{name}' must be {expected}, got {got}")


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name, t, ndim, dtypes, device, dims=None):
    if not isinstance(t, Tensor):
        _fail(name, "a torch.Tensor", type(t).__name__, TypeError)
    if t.dim() != ndim:
        _fail(name, f"a {ndim}-D tensor {dims or ''}".rstrip(), _describe(t))
    if t.dtype not in dtypes:
        _fail(name, f"of dtype in {[str(d) for d in dtypes]}", _describe(t), TypeError)
    if t.device != device:
        _fail(name, f"on device {device} (the device of x)", _describe(t))


def _check_dim(name, t, axis, size, what):
    if t.shape[axis] != size:
        _fail(name, f"of size {size} in dim {axis} ({what})", _describe(t))


def _check_finite_scale(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, "a float", type(value).__name__, TypeError)
    # Skipped while torch.compile traces: there a scale may be a symbolic float with no value to test
    # (math.isfinite on it breaks a fullgraph trace). Eager calls always check it.
    if not torch.compiler.is_compiling() and not math.isfinite(float(value)):
        _fail(name, "finite", repr(value))


def validate(x, expert_a, expert_b, gates, user_a, user_b, user_ids, *, user_ranks=None, expert_scale=1.0,
             user_scale=None, user_weight=None, out=None, check_values=True, layout=None) -> Problem:
    """Check every argument and return the normalised :class:`Problem`.

    Shape, dtype and device checks cost nothing and always run. ``check_values`` also checks tensor *values*
    (user ids in [-1, U), ranks in [0, r_max], finite per-user scales); that needs one host sync, so callers that
    validate ids once per batch (the model layer) or run under torch.compile / CUDA graphs turn it off. Meta
    tensors have no values: their value checks are skipped.
    ``layout``: a :class:`TokenLayout` of ``user_ids`` over the U users (``token_layout(user_ids, U)``), built once
    per batch and shared by every layer; its shapes are checked here, its values are the caller's promise.
    """
    _check_tensor("x", x, 2, FLOAT_DTYPES, x.device if isinstance(x, Tensor) else None, "[T, d_in]")
    T, d_in = x.shape
    dev, dt = x.device, x.dtype

    if (expert_a is None) != (expert_b is None) or (expert_a is None and gates is not None):
        raise ValueError("routed_lora: 'expert_a', 'expert_b' and 'gates' must be given together or all be None")
    if (user_a is None) != (user_b is None) or (user_a is None) != (user_ids is None):
        raise ValueError("routed_lora: 'user_a', 'user_b' and 'user_ids' must be given together or all be None")
    if expert_a is None and user_a is None:
        raise ValueError("routed_lora: nothing to compute: give experts (expert_a, expert_b, gates) "
                         "and/or users (user_a, user_b, user_ids)")

    d_out = None
    if expert_a is not None:
        if gates is None:
            raise ValueError("routed_lora: argument 'gates' must be a [T, K] tensor when experts are given")
        _check_tensor("expert_a", expert_a, 3, (dt,), dev, "[K, r_e, d_in]")
        K, r_e, _ = expert_a.shape
        _check_dim("expert_a", expert_a, 2, d_in, "d_in of x")
        _check_tensor("expert_b", expert_b, 3, (dt,), dev, "[K, d_out, r_e]")
        _check_dim("expert_b", expert_b, 0, K, "K of expert_a")
        _check_dim("expert_b", expert_b, 2, r_e, "r_e of expert_a")
        d_out = expert_b.shape[1]
        _check_tensor("gates", gates, 2, FLOAT_DTYPES, dev, "[T, K]")
        _check_dim("gates", gates, 0, T, "T of x")
        _check_dim("gates", gates, 1, K, "K of expert_a")
        _check_finite_scale("expert_scale", expert_scale)
        if K == 0:  # K = 0 experts is the same as no experts
            expert_a = expert_b = gates = None

    if user_a is not None:
        _check_tensor("user_a", user_a, 3, (dt,), dev, "[U, r_max, d_in]")
        U, r_max, _ = user_a.shape
        _check_dim("user_a", user_a, 2, d_in, "d_in of x")
        _check_tensor("user_b", user_b, 3, (dt,), dev, "[U, d_out, r_max]")
        _check_dim("user_b", user_b, 0, U, "U of user_a")
        _check_dim("user_b", user_b, 2, r_max, "r_max of user_a")
        if d_out is not None:
            _check_dim("user_b", user_b, 1, d_out, "d_out of expert_b")
        d_out = user_b.shape[1]
        _check_tensor("user_ids", user_ids, 1, INT_DTYPES, dev, "[T]")
        _check_dim("user_ids", user_ids, 0, T, "T of x")
        if user_ranks is not None:
            _check_tensor("user_ranks", user_ranks, 1, INT_DTYPES, dev, "[U]")
            _check_dim("user_ranks", user_ranks, 0, U, "U of user_a")
        if user_scale is None:
            pass
        elif isinstance(user_scale, Tensor):
            _check_tensor("user_scale", user_scale, 1, FLOAT_DTYPES, dev, "[U]")
            _check_dim("user_scale", user_scale, 0, U, "U of user_a")
            user_scale = user_scale.float()
        else:
            _check_finite_scale("user_scale", user_scale)
            user_scale = torch.full((U,), float(user_scale), dtype=torch.float32, device=dev)
        if user_weight is not None:
            _check_tensor("user_weight", user_weight, 1, FLOAT_DTYPES, dev, "[T]")
            _check_dim("user_weight", user_weight, 0, T, "T of x")
        if check_values and dev.type != "meta":  # meta tensors have shapes but no values to check
            _check_values(user_ids, U, user_ranks, r_max, user_scale)
        if layout is not None:
            _check_layout(layout, T, U, dev)
    else:
        for name, v in (("user_ranks", user_ranks), ("user_weight", user_weight), ("layout", layout)):
            if v is not None:
                raise ValueError(f"routed_lora: argument '{name}' was given without user adapters")
        user_scale = None

    if out is not None:
        _check_tensor("out", out, 2, (dt,), dev, "[T, d_out]")
        if tuple(out.shape) != (T, d_out):
            _fail("out", f"of shape {(T, d_out)}", _describe(out))

    return Problem(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, float(expert_scale),
                   user_scale, user_weight, d_out, layout)


def _check_layout(layout, T: int, U: int, device) -> None:
    if not isinstance(layout, TokenLayout):
        _fail("layout", "a proper_kernels.TokenLayout (from token_layout(user_ids, U))", type(layout).__name__,
              TypeError)
    for name, t, n in (("order", layout.order, T), ("seg_start", layout.seg_start, U + 1),
                       ("seg_len", layout.seg_len, U + 1)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n or t.device != device \
                or t.dtype != torch.int64:
            got = _describe(t) if isinstance(t, Tensor) else type(t).__name__
            _fail(f"layout.{name}", f"an int64 [{n}] tensor on {device} (T = {T}, U = {U})", got)


def _check_values(user_ids: Tensor, U: int, user_ranks, r_max: int, user_scale) -> None:
    """Value checks in one host sync: ids in [-1, U), ranks in [0, r_max], finite scales."""
    zero = torch.zeros((), dtype=torch.int64, device=user_ids.device)
    ids = user_ids.long()
    stats = [ids.min() if ids.numel() else zero, ids.max() if ids.numel() else zero]
    if user_ranks is not None and user_ranks.numel():
        stats += [user_ranks.long().min(), user_ranks.long().max()]
    if user_scale is not None and user_scale.numel():
        stats.append((~torch.isfinite(user_scale)).sum())
    vals = torch.stack(stats).tolist()
    if vals[0] < -1 or vals[1] >= U:
        bad = vals[0] if vals[0] < -1 else vals[1]
        _fail("user_ids", f"in [-1, {U}) (U = user_a.shape[0]; -1 = no user adapter)", f"user id {bad}")
    if user_ranks is not None and user_ranks.numel():
        if vals[2] < 0 or vals[3] > r_max:
            bad = vals[2] if vals[2] < 0 else vals[3]
            _fail("user_ranks", f"in [0, {r_max}] (r_max = user_a.shape[1])", f"rank {bad}")
    if user_scale is not None and user_scale.numel() and vals[-1] > 0:
        _fail("user_scale", "finite for every user", f"{int(vals[-1])} non-finite values")
