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
from ..store import ROW_KEYS
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
    src_state, dst_state = get_state(src), get_state(dst)
    if (src_state.slots is None) != (dst_state.slots is None):
        raise ValueError("copy_frozen_parts: both models must be paged (resident_users) or neither")
    rows = set(ROW_KEYS) if src_state.slots is not None else set()   # per-user rows: through the stores
    keys = []
    for name, layer in dst_state.layers.items():
        for part in FROZEN_PARTS:
            theirs = src_state.layers[name].part_tensors(part)
            for k, t in layer.part_tensors(part).items():
                if k in theirs and k not in rows:
                    t.copy_(theirs[k])
                    keys.append(f"{name}.{k}")
    if rows:
        keys += copy_stored_router_rows(src_state, dst_state)
    return keys


def copy_stored_router_rows(src_state, dst_state) -> List[str]:
    """Paged models: every stored user's router rows of ``src`` into ``dst``'s store (the rest of a user starts
    from its initial rows there, as in a dense copy of a model whose users were never trained)."""
    src_slots, dst_slots = src_state.slots, dst_state.slots
    dst_slots.drop_all()
    keys = [k for k, _, local, _ in src_slots.tables if local == "router.embedding.weight"
            and any(k == dk for dk, *_ in dst_slots.tables)]
    if not keys:
        return []
    for u in src_slots.stored_users():
        dst_slots.store.put(u, {k: src_slots.field(u, k).detach().to("cpu", copy=True) for k in keys})
    return keys


def run_ablation(name: str, main: "Trainer", loader: Callable[[], Tuple[Any, Any]]) -> Dict[str, Any]:
    """Train the ablation ``name`` (see the module docstring) on a second copy of the base model: the main
    run's frozen parts copied in, then the user stage on the same batches, with its own checkpoints under
    OUT/ablations/NAME (so --resume continues it too). Returns its test metrics."""
    cfg = dataclasses.replace(main.cfg, out=str(main.out / "ablations" / name), stop_after=None)
    model, tok = loader()
    pcfg = ablation_config(name, get_state(main.model).cfg)
    if pcfg.user_store is not None:   # its own store folder: two models never share one
        pcfg = dataclasses.replace(pcfg, user_store=str(Path(cfg.out) / "user_store"))
    resume_state = resume(Path(cfg.out) / "checkpoints", model, resident_users=pcfg.resident_users,
                          user_store=pcfg.user_store)[1] if main.cfg.resume else None
    if resume_state is None:
        apply_proper(model, pcfg)
        if get_state(model).slots is not None:
            get_state(model).slots.store.clear()
        copy_frozen_parts(main.model, model)
        broadcast_adapters(model)
    tr = Trainer(cfg, main.ds, model, tok, progress=main.progress, share_prefix=main.prefix)
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
