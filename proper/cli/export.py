"""`proper export RUN_OR_CHECKPOINT --users 3,17,42 | all --out DIR [--max-rank R]`: one peft LoRA folder per
user (proper.export_users) plus DIR/index.json, for serving with vLLM, LoRAX or peft (README: serving at scale).

RUN_OR_CHECKPOINT is a ``proper train --out`` run folder (its latest finished stage, OUT/stages/<stage>/, is
exported; the base model is SmolLM2 with the run's num_layers; user names come from run_config.json) or a
``proper.save_pretrained`` folder (base model: SmolLM2; a run's OUT/stages/<stage>/ also finds its run_config).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..io import CONFIG_NAME, from_pretrained
from ..io.export import export_users
from ..state import STAGES, get_state
from ..training import load_model

RUN_CONFIG = "run_config.json"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # the base model of `proper train` (train.load_model)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_export_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a `proper train --out` run folder or a proper.save_pretrained folder")
    p.add_argument("--users", required=True,
                   help="comma-separated user ids, 'all' for every user; -1 adds the cold start (e.g. all,-1)")
    p.add_argument("--out", required=True, help="folder for the user_<id>/ adapters and index.json")
    p.add_argument("--max-rank", type=int, default=None,
                   help="pad every module to this rank (engines that need one fixed rank); default: exact ranks")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="stored dtype (default: the model's)")
    p.add_argument("--base-model", default=None,
                   help=f"base_model_name_or_path written into each adapter (default: {SMOLLM2_ID})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_source(source: Path) -> Tuple[Path, Optional[Dict[str, Any]]]:
    """(the save_pretrained folder to export, the run's run_config.json contents or None)."""
    if (source / RUN_CONFIG).is_file():
        for stage in reversed(STAGES):   # the latest stage the run finished (each is saved when it finishes)
            ckpt = source / "stages" / stage
            if (ckpt / CONFIG_NAME).is_file():
                return ckpt, json.loads((source / RUN_CONFIG).read_text())
        raise FileNotFoundError(f"{source} is a run folder but {source / 'stages'} holds no finished stage yet")
    if (source / CONFIG_NAME).is_file():
        run = source.parent.parent / RUN_CONFIG   # OUT/stages/<stage>/ of a run
        return source, (json.loads(run.read_text()) if source.parent.name == "stages" and run.is_file() else None)
    raise FileNotFoundError(f"RUN_OR_CHECKPOINT {source} is neither a `proper train --out` run folder (with "
                            f"{RUN_CONFIG}) nor a proper.save_pretrained folder (with {CONFIG_NAME})")


def parse_users(spec: str, num_users: int) -> List[int]:
    """'3,17,-1' or 'all' (every user; 'all,-1' adds the cold start) -> ids in order, duplicates dropped."""
    ids: List[int] = []
    for tok in (t.strip() for t in spec.split(",")):
        if tok == "all":
            ids += range(num_users)
            continue
        try:
            u = int(tok)
        except ValueError:
            raise ValueError(f"--users must be 'all' or comma-separated ints (-1 = cold start), got {spec!r}") from None
        if not -1 <= u < num_users:
            raise ValueError(f"--users: user id {u} is outside [-1, {num_users}) (the checkpoint has {num_users} "
                             f"users; -1 = cold start)")
        ids.append(u)
    return list(dict.fromkeys(ids))


def _default_loader(num_layers: Optional[int]):
    return load_model(num_layers)[0]


def run_export_args(args: argparse.Namespace, *,
                    model_loader: Optional[Callable[[Optional[int]], torch.nn.Module]] = None) -> int:
    """Run `proper export`; returns the exit code. ``model_loader(num_layers)`` -> the bare base HF model
    (default: SmolLM2 via proper.training.load_model; tests pass a tiny model)."""
    try:
        ckpt, run = resolve_source(Path(args.source))
        num_layers = ((run or {}).get("train") or {}).get("num_layers")
        model = from_pretrained((model_loader or _default_loader)(num_layers), ckpt)
        cfg = get_state(model).cfg
        ids = parse_users(args.users, cfg.num_users)
        base = args.base_model or (SMOLLM2_ID if model_loader is None else None)
        if model_loader is None and num_layers is not None and args.base_model is None:
            print(f"proper export: warning: the run kept only the first {num_layers} layers of {SMOLLM2_ID}; "
                  f"serve these adapters on that truncated model", file=sys.stderr)
        index = export_users(model, ids, args.out, max_rank=args.max_rank,
                             dtype=DTYPES[args.dtype] if args.dtype else None,
                             names=(run or {}).get("users"), progress=not args.no_progress, base_model=base)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"proper export: {e}", file=sys.stderr)
        return 2
    n = sum(r["folder"] is not None for r in [*index["users"].values(), index["cold_start"] or {"folder": None}])
    print(f"exported {n} adapters from {ckpt} (stage {index['stage']}) to {args.out}; largest rank "
          f"{index['max_rank']} (vLLM: --max-lora-rank >= {index['max_rank']}); index: {Path(args.out) / 'index.json'}")
    return 0
