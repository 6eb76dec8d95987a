"""Per-model PROPER state: the stages, and the plain object that a patched model's layers share.

The state hangs off the model as a plain attribute (not a submodule, so it never enters a state dict) and holds
the config, the current stage and the adapted layers by name. Everything above the layers reaches it through
:func:`get_state`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

from torch import nn

from .config import ProperConfig

if TYPE_CHECKING:   # typing only: modules.linear imports this module
    from .modules.linear import ProperLinear

STAGES = ("population", "group", "user")

#: What each stage trains, as ProperLinear parts (ProperLinear.PARTS says which tensors form a part).
STAGE_TRAINS = {"population": ("population",), "group": ("experts", "router"), "user": ("users", "lora_router")}

_STATE_ATTR = "_proper_state"


class ProperState:
    """Per-model bookkeeping shared by that model's ProperLinear layers."""

    def __init__(self, cfg: ProperConfig):
        self.cfg = cfg
        self.stage = "user"
        self.experts_initialized = False   # the experts were copied from the population LoRA
        self.layers: Dict[str, "ProperLinear"] = {}

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
