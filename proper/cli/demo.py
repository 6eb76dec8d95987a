"""`proper demo`: the main job on the embedded SmolLM2-135M and the bundled MovieLens-100K users.

1. the op: every routed_lora backend on this machine vs the fp64 reference on mixed-user batches, and its
   speed vs the per-adapter loop people write by hand (proper/bench/op_check.py);
2. personalise a handful of users end to end: the three PROPER stages (population -> group -> user) with the
   `tiny` training budget, every stage in mixed-user batches through the fused op (proper/training/);
3. generate for all of them in one batch with the personalised model, next to the base model, and time
   batched multi-user generation: base model vs proper vs peft's mixed-adapter batch (same prompts, same
   number of new tokens, ratios measured in this run).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import data as D
from ..bench.op_check import format_op_rows, run_op_demo
from ..bench.serving import build_peft_mixed, build_proper_serving, demo_prompts, time_generate_interleaved
from ..generation import generate_for_users
from ..io import from_pretrained
from ..training import TrainConfig, load_model, run_train, summary_table


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 96 - len(text)), flush=True)


def personalise(users: int, out: Path, quick: bool) -> Dict[str, object]:
    """Train the three stages for `users` MovieLens users; returns the trainer's metrics."""
    cfg = TrainConfig(budget="tiny", out=str(out), max_users=users, seed=0, num_layers=4 if quick else None,
                      steps_population=2 if quick else None, steps_group=2 if quick else None,
                      steps_user=2 if quick else None, ablations=())   # ablations: `proper train` runs them
    t0 = time.time()
    metrics = run_train(cfg, progress=True)
    print(summary_table(metrics))
    print(f"(trained in {time.time() - t0:.0f} s; run directory {out})")
    return metrics


def _load(run: Optional[Path], quick: bool):
    """SmolLM2 (first 4 layers when quick), personalised from `run` when given."""
    model, tok = load_model(4 if quick else None)
    if run is not None:
        model = from_pretrained(model, run / "stages" / "user")
    return model.eval(), tok


def user_prompts(run: Path) -> List[Dict[str, object]]:
    """Each trained user's first test example: (row in the user table, prompt, true rating)."""
    names = json.loads((run / "run_config.json").read_text())["users"]
    ds = D.load_dataset("movielens-100k").subset(names)
    return [{"row": i, "user": u, "prompt": ds.users[u].test[0].input, "target": ds.users[u].test[0].target}
            for i, u in enumerate(names)]


def personalised_outputs(run: Path, quick: bool, new_tokens: int = 3) -> List[Dict[str, object]]:
    items = user_prompts(run)
    model, tok = _load(run, quick)
    pairs = [(it["row"], it["prompt"]) for it in items]
    ours = generate_for_users(model, tok, pairs, max_new_tokens=new_tokens)
    base = generate_for_users(model, tok, [(-1, p) for _, p in pairs], max_new_tokens=new_tokens)
    return [{**it, "proper": o.strip(), "base": b.strip()} for it, o, b in zip(items, ours, base)]


def generation_speed(n_users: int, new_tokens: int, quick: bool, reps: int) -> Dict[str, float]:
    """Median seconds of one batched generate for n_users prompts: base, proper, peft mixed batch (three copies
    of the model, timed in interleaved rounds)."""
    base, tok = _load(None, quick)
    ours = build_proper_serving(base, n_users, copy_base=True)
    peft = build_peft_mixed(base, n_users, copy_base=True)
    setups = {"base": (base, tok, None), "proper": (ours, tok, list(range(n_users))),
              "peft mixed batch": (peft, tok, [f"u{i}" for i in range(n_users)])}
    return time_generate_interleaved(setups, demo_prompts(n_users), new_tokens, reps)


def run_demo(quick: bool = False, skip_model: bool = False, users: int = 4, out: Optional[str] = None) -> int:
    torch.manual_seed(0)
    _banner("1. routed_lora on mixed-user batches: agreement with the fp64 reference, speed vs a per-adapter loop")
    sizes = dict(T_decode=16, T_prefill=128, d=256) if quick else {}
    print(format_op_rows(run_op_demo(**sizes)))
    if skip_model:
        return 0

    run = Path(out or tempfile.mkdtemp(prefix="proper-demo-")) / "run"
    _banner(f"2. PROPER on {users} MovieLens-100K users: population -> group -> user (tiny budget)")
    personalise(users, run, quick)

    _banner("3. one batched generate for every user: personalised model vs base model (rating prompts)")
    rows = personalised_outputs(run, quick)
    print("| user | movie | true rating | base model says | personalised says |\n|---|---|---|---|---|")
    for r in rows:
        movie = next((ln[len("movie: "):] for ln in r["prompt"].split("\n") if ln.startswith("movie: ")), "")[:50]
        print(f"| {r['user']} | {movie} | {r['target']} | {r['base']!r} | {r['proper']!r} |")

    n, new = (4, 4) if quick else (16, 32)
    _banner(f"4. speed: {n} prompts from {n} users, {new} new tokens, greedy (median of interleaved runs, here)")
    t = generation_speed(n, new, quick, reps=1 if quick else 3)
    print("| provider | s | x base time |\n|---|---:|---:|")
    for name, s in t.items():
        print(f"| {name} | {s:.2f} | {s / t['base']:.2f} |")
    print(f"\nproper is {t['peft mixed batch'] / t['proper']:.2f}x faster than peft's mixed-adapter batch "
          f"and costs {t['proper'] / t['base']:.2f}x the base model's own generate.")
    return 0
