"""The trained user-stage ablations: population+user (no groups) and proper_no_lora_router."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

from . import distributed as DD

from ..io import proper_state_dict
from ..patch import apply_proper, set_stage
from ..state import get_state
from .checkpoints import resume
from .config import ABLATIONS
from .trainer import Trainer


#: The parts an ablation takes over, frozen, from the main run (it trains the user stage itself).
FROZEN_PARTS = ("population", "experts", "router")


def ablation_config(name: str, main):
    """The ProperConfig of an ablation model, derived from the main run's config ``main``."""
    if name == "population+user":
        return dataclasses.replace(main, num_experts=0, top_k=0, population_rank=main.pop_rank, lora_router=False)
    if name == "proper_no_lora_router":
        return dataclasses.replace(main, lora_router=False)
    raise ValueError(f"unknown ablation {name!r}; known: {ABLATIONS}")


@torch.no_grad()
def copy_frozen_parts(src, dst) -> List[str]:
    """Copy the population LoRA, experts and user-aware routers (FROZEN_PARTS) of ``src`` into the same tensors
    of ``dst`` (both patched models of the same base) where ``dst`` has them; returns the copied keys."""
    src_layers = get_state(src).layers
    keys = []
    for name, layer in get_state(dst).layers.items():
        for part in FROZEN_PARTS:
            theirs = src_layers[name].part_tensors(part)
            for k, t in layer.part_tensors(part).items():
                if k in theirs:
                    t.copy_(theirs[k])
                    keys.append(f"{name}.{k}")
    return keys


def run_ablation(name: str, main: "Trainer", loader: Callable[[], Tuple[Any, Any]]) -> Dict[str, Any]:
    """Train the ablation ``name`` (see the module docstring) on a second copy of the base model: the main
    run's frozen parts copied in, then the user stage on the same batches, with its own checkpoints under
    OUT/ablations/NAME (so --resume continues it too). Returns its test metrics."""
    cfg = dataclasses.replace(main.cfg, out=str(main.out / "ablations" / name), stop_after=None)
    model, tok = loader()
    resume_state = resume(Path(cfg.out) / "checkpoints", model)[1] if main.cfg.resume else None
    if resume_state is None:
        apply_proper(model, ablation_config(name, get_state(main.model).cfg))
        copy_frozen_parts(main.model, model)
        broadcast_adapters(model)
    tr = Trainer(cfg, main.ds, model, tok, progress=main.progress)
    if resume_state is not None and tr.progress_path.is_file():
        tr.state = json.loads(tr.progress_path.read_text())
    if resume_state is None or not resume_state["finished"]:
        if cfg.steps("user"):
            tr.run_stage("user", resume=resume_state)
        else:
            set_stage(model, "user")
        tr.save_checkpoint("user", cfg.steps("user"), True, None, {})
    res = tr.evaluate_system(name)
    main.state["stages"][name] = tr.state["stages"].get("user", {})
    main.state["history"][name] = tr.state["history"].get("user", {})
    main.state["systems"][name] = res
    main.state.setdefault("predictions", {})[name] = tr.state.get("predictions", {}).get(name)
    main._save_progress()
    return res


def broadcast_adapters(model) -> None:
    """Under data parallelism, start every rank from rank 0's freshly initialised adapters and routers."""
    DD.broadcast_parameters(list(proper_state_dict(model).values()))
