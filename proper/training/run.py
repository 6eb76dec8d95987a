"""run_train: the whole three-stage run (resume, stages, ablations) and the files it writes."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .. import data as D
from . import distributed as DD

from ..config import ProperConfig
from ..io import proper_state_dict
from ..patch import apply_proper, set_stage
from ..state import STAGES, get_state
from .ablations import broadcast_adapters, run_ablation
from .checkpoints import resume, write_json
from .config import TrainConfig
from .evaluation import classic_baselines
from .model_setup import load_model, target_modules, truncate_layers
from .trainer import Trainer

log = logging.getLogger("proper.train")


def run_train(cfg: TrainConfig, *, model_loader: Optional[Callable[[], Tuple[Any, Any]]] = None,
              dataset: Optional[D.Dataset] = None, progress: bool = True) -> Dict[str, Any]:
    """Run (or resume) the three stages and write OUT/metrics.json; returns the metrics dict.

    ``model_loader()`` -> (hf_model, tokenizer) replaces the SmolLM2 loader (tests pass a cached copy);
    ``dataset`` replaces loading ``cfg.data``.
    """
    cfg = cfg.resolved()
    distributed = DD.init_from_env()
    if cfg.batch_size < DD.world_size():
        raise ValueError(f"--batch-size ({cfg.batch_size}) must be >= the number of processes ({DD.world_size()}): "
                         f"each rank trains on its slice of the global batch")
    progress = progress and DD.is_main()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    ds = dataset if dataset is not None else D.load_dataset(cfg.data, on_error=cfg.on_error)
    if ds.skipped:
        log.warning("data: skipped %s (see the problems list in metrics.json)", ds.skipped)
    if ds.meta.get("has_golds") is False:
        raise D.DataError(f"{ds.meta.get('source', cfg.data)}: no outputs (golds) file beside the LaMP questions; "
                          f"training scores the test questions, so it needs their gold outputs")
    ds = D.select_users(ds, cfg.max_users, cfg.seed)

    def loader():
        m, t = (model_loader or (lambda: load_model(cfg.num_layers)))()
        if cfg.num_layers is not None and len(m.get_decoder().layers) != cfg.num_layers:
            truncate_layers(m, cfg.num_layers)
        return m, t

    model, tok = loader()

    resident, store = cfg.paging(len(ds))
    if store is not None and DD.world_size() > 1:   # every rank keeps its own copy of the users
        store = str(Path(store) / f"rank{DD.rank()}")
    ck, resume_state = resume(out / "checkpoints", model, resident_users=resident, user_store=store) \
        if cfg.resume else (None, None)
    if ck is not None:
        if get_state(model).cfg.num_users != len(ds):
            raise ValueError(f"--resume: the checkpoint {ck} has {get_state(model).cfg.num_users} users but this run "
                             f"selects {len(ds)}; resume with the same --data/--max-users/--seed")
        log.info("resuming from %s", ck)
    elif cfg.resume:
        log.info("--resume: no checkpoint in %s, starting fresh", out / "checkpoints")
    if resume_state is None:
        pcfg = ProperConfig(num_users=len(ds), num_experts=cfg.num_experts, expert_rank=cfg.expert_rank,
                                   user_rank=cfg.user_rank, top_k=cfg.top_k, alpha=cfg.alpha,
                                   target_modules=target_modules(model, cfg.target_modules, cfg.lora_layers),
                                   backend=cfg.backend, resident_users=resident, user_store=store,
                                   router_scope=cfg.router_scope, token_router=cfg.token_router)
        apply_proper(model, pcfg)
        if get_state(model).slots is not None:   # a fresh run: nothing from an earlier run's store folder
            get_state(model).slots.store.clear()
        broadcast_adapters(model)

    tr = Trainer(cfg, ds, model, tok, progress=progress)
    if resume_state is not None and tr.progress_path.is_file():
        tr.state = json.loads(tr.progress_path.read_text())
    if DD.is_main():
        write_json(out / "run_config.json", {"train": dataclasses.asdict(cfg), "proper": get_state(model).cfg.to_dict(),
                                               "users": ds.user_list})
    done = resume_state["stage"] if resume_state is not None and resume_state["finished"] else None
    mid = resume_state if resume_state is not None and not resume_state["finished"] else None
    t0 = time.time()
    if resume_state is None:
        if ds.task == "rating":
            tr.state["systems"].update(classic_baselines(ds, tr.test_examples, tr.state.setdefault("predictions", {}),
                                                         seed=cfg.seed))
        set_stage(model, "population")
        tr.evaluate_system("base")
    stages = [s for s in STAGES if not (s == "group" and cfg.num_experts == 0)]
    first = 0
    if done is not None:
        first = stages.index(done) + 1
    elif mid is not None:
        first = stages.index(mid["stage"])
    for stage in stages[first:]:
        if cfg.steps(stage) == 0:
            set_stage(model, stage)
        else:
            tr.run_stage(stage, resume=mid if (mid is not None and mid["stage"] == stage) else None)
        tr.after_stage(stage)
        tr.save_checkpoint(stage, cfg.steps(stage), True, None, {})
        mid = None
    for name in cfg.ablations:
        if name in tr.state["systems"]:
            continue
        if name == "proper_no_lora_router" and not get_state(model).cfg.lora_router:
            continue   # the main model has no LoRA-aware router: it is this ablation already
        if name == "proper_no_lora_router" and cfg.num_experts == 0:
            continue
        run_ablation(name, tr, loader)
    metrics = {"task": ds.task, "systems": tr.state["systems"], "stages": tr.state["stages"],
               "groups": {k: {kk: vv for kk, vv in v.items() if kk != "users"} for k, v in tr.state["groups"].items()},
               "data": {"name": ds.name, **ds.counts(), "split": ds.meta.get("split"),
                        "test_scored": len(tr.test_examples),
                        "dev_scored": len(tr.dev_items), "skipped": ds.skipped, "problems": ds.problems[:50],
                        "profile_buckets": _bucket_counts(ds)},
               "config": dataclasses.asdict(cfg), "proper_config": get_state(model).cfg.to_dict(),
               "seconds_this_session": round(time.time() - t0, 1)}
    if distributed:
        digests = DD.gather_digests(weights_for_digest(model))
        metrics["distributed"] = {"world_size": DD.world_size(), "backend": torch.distributed.get_backend(),
                                  "weights_sha256_per_rank": digests}
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel ranks finished with different weights: {digests}")
    if DD.is_main():
        write_json(out / "metrics.json", metrics)
        write_json(out / "history.json", tr.state["history"])
        write_json(out / "group_assignments.json", tr.state["groups"])
        write_json(out / "predictions.json", {
            "examples": [{"user": ex.user, "target": ex.target, "profile_size": n}
                         for ex, n in zip(tr.test_examples, tr.sizes)],
            "systems": tr.state.get("predictions", {})})
    DD.barrier()
    return metrics


def _bucket_counts(ds: D.Dataset) -> Dict[str, int]:
    c: Dict[str, int] = {}
    for s in ds.users.values():
        b = D.profile_bucket(s.profile_size)
        c[b] = c.get(b, 0) + 1
    return c


def weights_for_digest(model) -> Dict[str, torch.Tensor]:
    """Every PROPER weight, a paged model's stored users included (their records, moments too): what must be
    identical on every data-parallel rank."""
    out = dict(proper_state_dict(model))
    slots = get_state(model).slots
    if slots is not None:
        slots.flush()
        for u in slots.store.user_ids():
            out.update({f"user{u}.{k}": t for k, t in slots.store.get(u).items() if k != "@epoch"})   # (per rank)
    return out
