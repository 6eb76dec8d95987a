"""``proper train``'s command line: the options (defaults from TrainConfig, then the --budget preset) and the
entry point that turns them into a run."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import data as D
from ..training import BUDGETS, ABLATIONS, TrainConfig, TrainingInterrupted, run_train, summary_table
from ..training.config import GROUP_INITS, PAGE_ABOVE
from ..config import ROUTER_SCOPES
from ..training import distributed as DD


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``proper train`` options (defaults: TrainConfig, then the --budget preset)."""
    p.add_argument("--data", default="movielens-100k",
                   help="movielens-100k (built in), a .jsonl file in our schema, or LaMP questions .json / folder")
    p.add_argument("--out", default="runs/proper", help="run directory (metrics.json, checkpoints, stages)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default",
                   help="preset sizes: default (20-40 min on 2 CPU cores, a seeded random subset of 128 users), "
                        "full (every user, longer group and user stages; RESULTS.md has its wall time) or tiny "
                        "(a minutes-long smoke run)")
    p.add_argument("--max-users", default=None, help="N or 'all' (default: the budget's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.json")
    for name, typ in (("batch_size", int), ("steps_population", int), ("steps_group", int), ("steps_user", int),
                      ("eval_every", int), ("patience", int), ("num_experts", int), ("top_k", int),
                      ("expert_rank", int), ("user_rank", int), ("lr", float), ("user_lr", float),
                      ("group_lr", float), ("router_lr", float),
                      ("max_len", int), ("dev_max", int), ("test_max", int), ("num_layers", int),
                      ("max_history", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    p.add_argument("--lora-layers", default=None, help="adapt only the top N decoder layers ('all': every layer; "
                   "default: the budget's)")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--select-by", choices=("loss", "mae"), default=None,
                   help="early stopping of each stage: the dev loss, or (rating tasks) the dev MAE of the median "
                        "rule with the loss breaking ties; default: the budget's")
    p.add_argument("--group-init", choices=GROUP_INITS, default=None,
                   help="the group assignments at the group stage's start: 'ratings' (users clustered by their "
                        "training ratings' histogram; rating tasks) or 'random' (the router's seeded random rows); "
                        "default: the budget's")
    p.add_argument("--lb-coef", type=float, default=0.01, help="load-balancing weight (group stage)")
    p.add_argument("--distinct-coef", type=float, default=0.01, help="experts-distinct weight (group stage)")
    p.add_argument("--sampling", choices=("example", "user"), default="example")
    p.add_argument("--ablations", default=None,
                   help=f"comma-separated trained user-stage ablations among {', '.join(ABLATIONS)} ('' for none; "
                        f"default: the budget's)")
    p.add_argument("--router-scope", choices=ROUTER_SCOPES, default="model",
                   help="the user-aware router: one for the model (a user's one group assignment), a shared "
                        "embedding with per-layer heads, or one per layer")
    p.add_argument("--token-router", action="store_true",
                   help="add a per-token term to the group gates (ProperConfig.token_router; off: per-user gates as "
                        "in the paper; on: the per-user export is inexact and refused)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate within each stage: constant, or a cosine down to 10%% at its last step")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warmup over each stage's first N steps (each stage starts a fresh "
                        "AdamW; default 0: none)")
    p.add_argument("--user-select", choices=("dev", "none"), default="dev",
                   help="per-user early stopping: keep a user's LoRA only where it lowered that user's dev loss")
    p.add_argument("--select-per-user", type=int, default=None,
                   help="dev ratings per user scored for --user-select dev (default: the budget's)")
    p.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=None,
                   help="also score PROPER with the LoRA-aware router off and as a cold start (default: budget's)")
    p.add_argument("--target-modules", default="gate_proj,up_proj,down_proj", help="comma-separated")
    p.add_argument("--backend", default="auto")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="Polyak averaging of the population and group stages' weights: dev evaluations, early "
                        "stopping and the stage's result use the average (0: off; default: the budget's)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="scoring passes (dev, test, per-user selection) run only the adapted top layers, the frozen "
                        "bottom layers' hidden states cached per example (default: on)")
    p.add_argument("--stop-after", default=None, help=argparse.SUPPRESS)
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad data lines or users: raise (the default: name the file and line) or skip and count "
                        "them (metrics.json -> data.skipped / problems)")
    p.add_argument("--resident-users", default="auto",
                   help="user slots held in the model (the paged user store): 'auto' (page above "
                        f"{PAGE_ABOVE} users), 'all' (no paging) or N")
    p.add_argument("--user-store", default=None, help="the user store's folder when paged (default: OUT/user_store)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if isinstance(kw.get("ablations"), str):
        kw["ablations"] = tuple(s.strip() for s in kw["ablations"].split(",") if s.strip())
    if isinstance(kw.get("target_modules"), str):
        kw["target_modules"] = tuple(s.strip() for s in kw["target_modules"].split(",") if s.strip())
    ll = kw.get("lora_layers")
    if isinstance(ll, str):
        if ll.lower() == "all":
            kw["lora_layers"] = "all"
        else:
            try:
                kw["lora_layers"] = int(ll)
            except ValueError:
                raise SystemExit(f"proper train: --lora-layers must be an integer or 'all', got {ll!r}") from None
    ru = kw.get("resident_users")
    if isinstance(ru, str) and ru.lower() not in ("auto", "all"):
        try:
            kw["resident_users"] = int(ru)
        except ValueError:
            raise SystemExit(f"proper train: --resident-users must be 'auto', 'all' or a positive integer, got "
                             f"{ru!r}") from None
    mu = kw.get("max_users")
    if isinstance(mu, str) and mu.lower() != "all":
        try:
            kw["max_users"] = int(mu)
        except ValueError:
            raise SystemExit(f"proper train: --max-users must be a positive integer or 'all', got {mu!r}") from None
    return TrainConfig(**kw)


def run_train_args(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = config_from_args(args).resolved()
    except ValueError as e:
        print(f"proper train: {e}", file=sys.stderr)
        return 2
    if DD.init_from_env() and not DD.is_main():
        logging.getLogger("proper").setLevel(logging.WARNING)   # one rank reports
    main = DD.is_main()
    try:
        metrics = run_train(cfg, progress=not getattr(args, "no_progress", False))
    except (D.DataError, D.MissingDataError, FileNotFoundError) as e:
        print(f"proper train: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"proper train: {e}; continue with --resume", file=sys.stderr)
        return 3
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if main:
        print(summary_table(metrics))
        print(f"metrics: {Path(cfg.out) / 'metrics.json'}")
    return 0


def main_train(argv: Optional[Sequence[str]] = None) -> int:
    p = add_train_arguments(argparse.ArgumentParser(prog="proper train", description="three-stage PROPER training"))
    return run_train_args(p.parse_args(argv))


