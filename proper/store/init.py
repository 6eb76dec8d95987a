"""Deterministic per-user initialisation: user u's initial rows depend only on (seed, layer, tensor, u).

So a user created on first use (paged in) gets bit for bit the weights that an eager, dense table gives it, in
any order and on any device (drawn on the CPU, then copied). B rows start at zero, as in LoRA.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor


def user_seed(seed: int, layer: str, key: str, user: int) -> int:
    """A 63-bit generator seed for one (layer, tensor key, user)."""
    h = hashlib.blake2b(f"{seed}\0{layer}\0{key}\0{user}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _gen(seed: int, layer: str, key: str, user: int) -> torch.Generator:
    return torch.Generator().manual_seed(user_seed(seed, layer, key, user))


def init_user_a(out: Tensor, how: str, seed: int, layer: str, user: int) -> Tensor:
    """Fill ``out`` [r, d_in] with user ``user``'s initial A (peft's lora_A init) and return it."""
    r, d_in = out.shape
    t = torch.empty(r, d_in, dtype=torch.float32)
    g = _gen(seed, layer, "user_a", user)
    if how == "gaussian":
        t.normal_(0.0, 1.0 / max(r, 1), generator=g)
    else:   # kaiming_uniform_(a=sqrt(5)) on [r, d_in]: bound = 1 / sqrt(d_in)
        bound = 1.0 / math.sqrt(d_in)
        t.uniform_(-bound, bound, generator=g)
    return out.copy_(t)


def init_router_row(out: Tensor, std: float, seed: int, layer: str, user: int) -> Tensor:
    """Fill ``out`` [dim] with user ``user``'s initial user-aware router embedding, N(0, std)."""
    t = torch.empty(out.shape, dtype=torch.float32).normal_(0.0, std, generator=_gen(seed, layer, "router", user))
    return out.copy_(t)
