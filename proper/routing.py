"""Read and steer a patched model's routing at inference (public API).

    with proper.lora_router_disabled(model):     # w = 1 and the user-aware gates: user and group outputs add
        ...
    r = proper.user_routing(model, [0, 5, -1])   # {layer name: (gates [B, K] or None, w [B] or None)}
    g = proper.user_gates(model, [0, 5, -1])     # [L, B, K] gates of each user in each adapted layer
    proper.refresh_cold_start(model)             # a paged model: cold-start gates over the stored users
    proper.reset_user_adapters(model, [3, 7])    # those users' own LoRA B = 0: the groups serve them
    proper.set_router_logits(model, ids, logits) # start users' group gates at given logits (e.g. clusters)
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .context import check_user_ids, lora_router_off, make_batch
from .state import get_state, proper_layers


@contextlib.contextmanager
def lora_router_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with the LoRA-aware router switched off (w = 1, gates from the user-aware router only);
    restored on exit, also after an exception. The switch is per thread/task (a context variable) and never
    touches the config: other threads keep their router, and a save inside the block saves the model as it is
    outside it."""
    with lora_router_off(get_state(model)):
        yield model


@torch.no_grad()
def user_routing(model: nn.Module, user_ids: Union[Tensor, Sequence[int]],
                 stage: Optional[str] = None) -> Dict[str, Tuple[Optional[Tensor], Optional[Tensor]]]:
    """Per adapted layer: (gates [B, K] or None without experts, w [B] or None without a LoRA-aware router) of
    the users ``user_ids`` (-1 = unknown user: the population-average gates), as ``stage`` (default: the
    model's current stage) routes them. Gates of the "population" stage are None (no experts there)."""
    state = get_state(model)
    stage = stage or state.stage
    layers = proper_layers(model)
    if stage == "population":
        check_user_ids(state, user_ids)   # (validates the ids; pages nothing in)
        return {name: (None, None) for name in layers}
    # a paged model routes chunks of users that fit its slots, each paged in while it is routed
    ids = check_user_ids(state, user_ids)
    step = ids.numel() if state.slots is None else state.slots.chunk
    parts = []
    for lo in range(0, ids.numel(), step):
        batch = make_batch(state, ids[lo:lo + step])
        parts.append({name: layer.route_users(batch, batch.ids, stage) for name, layer in layers.items()})
    if len(parts) == 1:
        return parts[0]
    return {name: tuple(None if parts[0][name][i] is None else torch.cat([p[name][i] for p in parts])
                        for i in (0, 1)) for name in layers}


@torch.no_grad()
def refresh_cold_start(model: nn.Module) -> None:
    """A paged model's cold-start gates (user id -1): per layer, the mean of softmax(router logits) over every
    user the store holds (trained or imported users, dirty slots written back first; a never-seen user is not
    part of the population). Reads just the router rows. A dense model averages over its whole table on each
    forward, so there is nothing to do."""
    state = get_state(model)
    slots = state.slots
    if slots is None:
        return
    users = slots.stored_users()
    for name, layer in state.layers.items():
        r = getattr(layer, "router", None)
        if r is None:
            continue
        if not users:
            r.cold_start.fill_(1.0 / r.num_experts)
            continue
        key = f"{name if r.owns_table else state.router_layer}.router.embedding.weight"
        acc = torch.zeros(r.num_experts, dtype=torch.float64, device=r.cold_start.device)
        for lo in range(0, len(users), 4096):
            e = torch.stack([slots.field(u, key) for u in users[lo:lo + 4096]])
            acc += torch.softmax(r.proj(e).float(), dim=-1).sum(0).double()
        r.cold_start.copy_((acc / len(users)).float())


@torch.no_grad()
def set_router_logits(model: nn.Module, user_ids: Sequence[int], logits: Tensor) -> None:
    """Make the user-aware router give the users ``user_ids`` [B] the logits ``logits`` [B, K] (so their gates are
    top_k(softmax(logits))), e.g. a data-driven start of the group assignments (training/group_init.py).

    Every user-aware router (the model-level one, each head of router_scope="heads", or each layer's) gets the
    projection W = [I_K | 0] and b = 0, and each listed user's embedding row becomes [logits_u, 0, ...]. Users
    not listed keep their embedding rows, which now read through the new W: list every user of the model. Needs
    router_dim >= K. A paged model pages the users in chunks and marks them changed."""
    state = get_state(model)
    cfg = state.cfg
    if not cfg.num_experts:
        raise ValueError("set_router_logits: the model has no group experts (num_experts=0)")
    ids = [int(u) for u in check_user_ids(state, list(user_ids)).tolist()]
    if any(u < 0 for u in ids):
        raise ValueError("set_router_logits: argument 'user_ids' must hold known users (ids >= 0), got a -1")
    K = cfg.num_experts
    if tuple(logits.shape) != (len(ids), K):
        raise ValueError(f"set_router_logits: argument 'logits' must have shape [{len(ids)}, {K}] (users, experts), "
                         f"got {list(logits.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("set_router_logits: argument 'logits' must be finite")
    routers = {id(r): r for r in (layer.user_router for layer in state.layers.values()) if r is not None}
    dim = next(iter(routers.values())).proj.in_features
    if dim < K:
        raise ValueError(f"set_router_logits: needs router_dim >= num_experts, got {dim} < {K}")
    tables = {id(r.table): r.table for r in routers.values()}
    for r in routers.values():
        r.proj.weight.zero_()
        r.proj.weight[:, :K].copy_(torch.eye(K))
        r.proj.bias.zero_()
    step = max(1, len(ids) if state.slots is None else state.slots.chunk)
    for lo in range(0, len(ids), step):
        rows = torch.as_tensor(state.user_rows(ids[lo:lo + step], write=True))
        for t in tables.values():
            w = t.weight
            rows_d = rows.to(w.device)
            w.index_fill_(0, rows_d, 0.0)
            w[rows_d, :K] = logits[lo:lo + step].to(device=w.device, dtype=w.dtype)


@torch.no_grad()
def reset_user_adapters(model: nn.Module, user_ids: Sequence[int]) -> None:
    """Set the users' LoRA B to zero in every adapted layer: their own LoRA then adds nothing (and a LoRA-aware
    router reads zero features from it), so they are served by the groups / population LoRA. A paged model
    pages them in chunks and marks them changed."""
    state = get_state(model)
    ids = [int(u) for u in check_user_ids(state, list(user_ids)).tolist()] if len(user_ids) else []
    step = max(1, len(ids) if state.slots is None else state.slots.chunk)
    for lo in range(0, len(ids), step):
        rows = state.user_rows(ids[lo:lo + step], write=True)
        for layer in state.layers.values():
            layer.user_b.index_fill_(0, torch.as_tensor(rows, device=layer.user_b.device), 0.0)


def user_gates(model: nn.Module, user_ids: Union[Tensor, Sequence[int]],
               stage: Optional[str] = None) -> Optional[Tensor]:
    """[L, B, K] fp32 gates of each user in each adapted layer (layer order of proper_layers), or None when the
    model has no experts."""
    routes = user_routing(model, user_ids, stage)
    gates = [g for g, _ in routes.values()]
    if not gates or any(g is None for g in gates):
        return None
    return torch.stack([g.float() for g in gates])
