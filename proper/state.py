"""Per-model PROPER state: the stages, and the plain object that a patched model's layers share.

The state hangs off the model as a plain attribute (not a submodule, so it never enters a state dict) and holds
the config, the current stage, the adapted layers by name, the users the forwards since the last optimizer
step saw (the rows the row-sparse optimizer, proper/optim.py, may move) and, for a paged model, its user slots
(proper/store/). Everything above the layers reaches it
through :func:`get_state`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .config import ProperConfig
from .store import UserSlots, UserStore

if TYPE_CHECKING:   # typing only: modules.linear imports this module
    from .modules.linear import ProperLinear

STAGES = ("population", "group", "user")

#: What each stage trains, as ProperLinear parts (ProperLinear.PARTS says which tensors form a part).
STAGE_TRAINS = {"population": ("population",), "group": ("experts", "router"), "user": ("users", "lora_router")}

_STATE_ATTR = "_proper_state"

#: Recorded batches kept before they are folded into one tensor of unique ids (a host sync, once per this many
#: forwards with gradients and no optimizer step): bounds the record of a loop that never steps.
TOUCHED_FOLD = 64


class ProperState:
    """Per-model bookkeeping shared by that model's ProperLinear layers."""

    def __init__(self, cfg: ProperConfig):
        self.cfg = cfg
        self.stage = "user"
        self.experts_initialized = False   # the experts were copied from the population LoRA
        self.layers: Dict[str, "ProperLinear"] = {}
        self.touched: List[Tensor] = []    # table rows of the forwards run with gradients since the last step
        # the model-level user-aware router (cfg.router_scope "model" / "heads"): a module of the first adapted
        # layer (router_layer), read by every layer
        self.router: Optional[nn.Module] = None
        self.router_layer: Optional[str] = None
        # the paged user store (cfg.resident_users): None when every user has its own row in the tables
        self.slots: Optional[UserSlots] = UserSlots(self, UserStore(cfg.user_store)) if cfg.paged else None

    def user_rows(self, user_ids: Sequence[int], *, pin: bool = False, write: bool = False) -> List[int]:
        """The table row of each user id (-1 stays -1): the id itself, or its slot when paged (paging it in;
        ``pin`` / ``write`` as UserSlots.rows)."""
        if self.slots is None:
            return list(user_ids)
        return self.slots.rows(user_ids, pin=pin, write=write)

    def user_row(self, user_id: int, *, write: bool = False) -> int:
        return self.user_rows([int(user_id)], write=write)[0]

    def record_touched(self, ids: Tensor) -> None:
        """Note the users ``ids`` [B] of a forward that runs with gradients. Every layer of a forward calls this
        with the same tensor (its UserBatch's), so a forward adds one entry; no host sync."""
        t = self.touched
        if t and t[-1] is ids:
            return
        t.append(ids)
        if len(t) > TOUCHED_FOLD:
            self.touched = [torch.cat(t).unique()]

    def touched_rows(self) -> Tensor:
        """Sorted unique user rows (ids >= 0) recorded since :meth:`clear_touched`: int64 [n] (one host sync)."""
        if not self.touched:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        u = torch.cat(self.touched).unique()
        return u[u >= 0]

    def clear_touched(self) -> None:
        self.touched = []

    @property
    def device(self):
        return next(iter(self.layers.values())).weight.device


def attach_state(model: nn.Module, state: ProperState) -> None:
    object.__setattr__(model, _STATE_ATTR, state)   # a plain attribute, not a submodule


def find_state(model: nn.Module) -> Optional[ProperState]:
    """The model's state, or None when it was never patched."""
    return getattr(model, _STATE_ATTR, None)


def get_state(model: nn.Module) -> ProperState:
    state = find_state(model)
    if state is None:
        raise ValueError(f"proper: this {type(model).__name__} has no PROPER layers; call "
                         f"proper.apply_proper(model, cfg) first")
    return state


def proper_layers(model: nn.Module) -> Dict[str, "ProperLinear"]:
    """The ProperLinear layers of a patched model, by module name."""
    return dict(get_state(model).layers)


def get_stage(model: nn.Module) -> str:
    return get_state(model).stage
