"""Read and steer a patched model's routing at inference (public API).

    with proper.lora_router_disabled(model):     # w = 1 and the user-aware gates: user and group outputs add
        ...
    r = proper.user_routing(model, [0, 5, -1])   # {layer name: (gates [B, K] or None, w [B] or None)}
    g = proper.user_gates(model, [0, 5, -1])     # [L, B, K] gates of each user in each adapted layer
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .context import lora_router_off, make_batch
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
    batch = make_batch(state, user_ids)
    if stage == "population":
        return {name: (None, None) for name in layers}
    return {name: layer.route_users(batch, batch.ids, stage) for name, layer in layers.items()}


def user_gates(model: nn.Module, user_ids: Union[Tensor, Sequence[int]],
               stage: Optional[str] = None) -> Optional[Tensor]:
    """[L, B, K] fp32 gates of each user in each adapted layer (layer order of proper_layers), or None when the
    model has no experts."""
    routes = user_routing(model, user_ids, stage)
    gates = [g for g, _ in routes.values()]
    if not gates or any(g is None for g in gates):
        return None
    return torch.stack([g.float() for g in gates])
