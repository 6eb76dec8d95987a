"""apply_proper(): swap the named linear modules of one model instance for ProperLinear; set_stage()."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List

import torch
from torch import nn

from .config import ProperConfig
from .hf_users import install_user_ids_keyword
from .modules.linear import ProperLinear, is_conv1d
from .state import STAGE_TRAINS, STAGES, ProperState, attach_state, find_state, get_state


def linear_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Every nn.Linear / Conv1D of `model`, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):                        # one regex, full match (peft's convention)
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_summary(linears: Iterable[str]) -> str:
    """Leaf names with counts, e.g. "q_proj (30), lm_head (1)": short even for deep models."""
    counts: Dict[str, int] = {}
    for n in linears:
        leaf = n.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in counts.items()) or "none"


def apply_proper(model: nn.Module, cfg: ProperConfig) -> nn.Module:
    """Swap the modules named by cfg.target_modules for ProperLinear, in place, on this instance only.

    The base model's parameters are frozen; the stage starts as "user" (every part that exists runs; all B
    start at zero, so the output equals the base model's until something is trained or imported).
    Raises ValueError if a target matches no linear module (listing the model's linear modules), or
    matches a module that is not nn.Linear / Conv1D.
    """
    if not isinstance(cfg, ProperConfig):
        raise TypeError(f"apply_proper: argument 'cfg' must be a ProperConfig, got {type(cfg).__name__}")
    if find_state(model) is not None:
        raise ValueError("apply_proper: this model already has PROPER layers (apply_proper was called on it before)")
    linears = linear_modules(model)
    targets = cfg.target_modules
    chosen: List[str] = [n for n in linears if _matches(n, targets)]
    unmatched = []
    for t in ([targets] if isinstance(targets, str) else targets):
        if not any(_matches(n, (t,) if not isinstance(targets, str) else t) for n in linears):
            unmatched.append(t)
    if unmatched:
        others = [n for n, m in model.named_modules()
                  if n and n not in linears and any(_matches(n, (t,) if not isinstance(targets, str) else t)
                                                    for t in unmatched)]
        hint = f" (these match but are not linear: {others[:5]})" if others else ""
        raise ValueError(f"apply_proper: target_modules {unmatched} match no linear module of "
                         f"{type(model).__name__}{hint}. Its linear modules: {_linear_summary(linears)}")

    for p in model.parameters():        # the base stays frozen: only PROPER parts ever train
        p.requires_grad_(False)
    state = ProperState(cfg)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = linears[name]
        layer = ProperLinear(base, cfg, state, name).train(base.training)   # keeps the model's train/eval mode
        setattr(parent, child, layer)    # instance-level swap: no class is patched
        state.layers[name] = layer
    attach_state(model, state)
    set_stage(model, "user")
    install_user_ids_keyword(model)   # model(..., user_ids=) and generate(..., user_ids=)
    return model


def _trainable(layer: ProperLinear, stage: str) -> List[nn.Parameter]:
    """The parameters ``stage`` trains in this layer (STAGE_TRAINS, by part)."""
    return [p for part in STAGE_TRAINS[stage] for p in layer.part_parameters(part)]


@torch.no_grad()
def init_experts_from_population(model: nn.Module) -> None:
    """Copy the population LoRA into every group expert (PROPER's start of the group stage)."""
    state = get_state(model)
    cfg = state.cfg
    if not cfg.num_experts or cfg.pop_rank != cfg.expert_rank:
        raise ValueError(f"init_experts_from_population: needs num_experts > 0 and population_rank == expert_rank, "
                         f"got num_experts={cfg.num_experts}, population_rank={cfg.pop_rank}, "
                         f"expert_rank={cfg.expert_rank}")
    for layer in state.layers.values():   # population_a/_b -> expert_a/_b, pairing the two parts' tensors
        for src, dst in zip(layer.part_tensors("population").values(), layer.part_tensors("experts").values()):
            dst.copy_(src.expand_as(dst))
    state.experts_initialized = True


def set_stage(model: nn.Module, stage: str, *, init_experts="auto") -> nn.Module:
    """Select what runs and what trains.

    population  runs the population LoRA (K = 1, gate 1; no users context needed); trains it.
    group       runs the K experts gated by the user-aware router; trains experts + router.
    user        runs the frozen experts + each user's LoRA (weighted by the LoRA-aware router's w);
                trains the user LoRAs + LoRA-aware router.
    Everything else gets requires_grad=False (the base model always).
    init_experts: "auto" copies the population LoRA into the experts the first time the group stage starts
    (when the ranks agree); True always copies; False never does.
    """
    state = get_state(model)
    if stage not in STAGES:
        raise ValueError(f"set_stage: argument 'stage' must be one of {STAGES}, got {stage!r}")
    cfg = state.cfg
    if stage == "group" and not cfg.num_experts:
        raise ValueError("set_stage: stage 'group' needs group experts, but the config has num_experts=0")
    if stage == "population" and not cfg.pop_rank:
        raise ValueError("set_stage: stage 'population' needs a population LoRA, but the config has "
                         "population_rank=0 (it defaults to expert_rank only when num_experts > 0)")
    if init_experts not in ("auto", True, False):
        raise ValueError(f"set_stage: argument 'init_experts' must be 'auto', True or False, got {init_experts!r}")
    if stage == "group":
        auto = init_experts == "auto" and not state.experts_initialized and cfg.pop_rank == cfg.expert_rank
        if init_experts is True or auto:
            init_experts_from_population(model)
    for layer in state.layers.values():
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in _trainable(layer, stage):
            p.requires_grad_(True)
    state.stage = stage
    return model


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters the current stage trains (requires_grad=True)."""
    return [p for layer in get_state(model).layers.values() for p in layer.parameters() if p.requires_grad]
