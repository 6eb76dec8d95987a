"""`proper demo`: the main job on the embedded SmolLM2-135M and the bundled MovieLens-100K users.

1. the op: every routed_lora backend on this machine vs the fp64 reference on mixed-user batches, and its
   speed vs the per-adapter loop people write by hand (proper/bench/op_check.py);
2. personalise a handful of users end to end: the three PROPER stages (population -> group -> user) with the
   `tiny` training budget, every stage in mixed-user batches through the fused op (proper/training/);
3. score each user's held-out rating with the personalised model and with the base model (the argmax over the
   five rating tokens, as the trainer scores them), next to the true rating; then a short free-text generation
   for a few users in one batch, where the users' differences can be read;
4. time batched multi-user generation: base model vs proper vs peft's mixed-adapter batch (same prompts, same
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
from ..config import ProperConfig
from ..io import from_pretrained
from ..patch import apply_proper
from ..training import TrainConfig, encode, load_model, run_train, summary_table
from ..training.evaluation import score_next_token

FREE_PROMPT = "In two sentences, which kind of film would you pick for tonight, and why?"


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


def predicted_ratings(model, tok, items: List[Dict[str, object]], rows: List[int]) -> List[int]:
    """The rating each item's prompt gets: argmax over the five rating tokens after the prompt (the trainer's
    scoring), with the users ``rows`` (-1: no user)."""
    exs = [D.Example(str(it["user"]), str(it["prompt"]), str(it["target"])) for it in items]
    enc = encode(tok, exs, rows, max_len=256, add_eos=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    probs = score_next_token(model, enc, pad, batch_size=16, candidate_ids=D.rating_token_ids(tok))["probs"]
    return [int(p.argmax()) + 1 for p in probs]


def personalised_outputs(run: Path, quick: bool) -> List[Dict[str, object]]:
    """Per trained user: the true rating, the personalised model's and the base model's predicted rating."""
    items = user_prompts(run)
    model, tok = _load(run, quick)
    ours = predicted_ratings(model, tok, items, [int(it["row"]) for it in items])
    base, _ = _load(None, quick)   # the untouched base model (adapters at zero: exactly the base)
    apply_proper(base, ProperConfig(num_users=1, lora_router=False))
    theirs = predicted_ratings(base, tok, items, [-1] * len(items))
    return [{**it, "proper": o, "base": b} for it, o, b in zip(items, ours, theirs)]


def free_text(run: Path, quick: bool, n_users: int = 3, new_tokens: int = 24) -> List[Dict[str, object]]:
    """The same free-text prompt for the first ``n_users`` users and for no user (-1), in one batch."""
    names = json.loads((run / "run_config.json").read_text())["users"][:n_users]
    model, tok = _load(run, quick)
    pairs = [(i, FREE_PROMPT) for i in range(len(names))] + [(-1, FREE_PROMPT)]
    texts = generate_for_users(model, tok, pairs, max_new_tokens=new_tokens, chat=True)
    return [{"user": names[u] if u >= 0 else "(no user)", "text": t.strip()} for (u, _), t in zip(pairs, texts)]


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

    _banner("3. each user's held-out rating: personalised model vs base model (argmax over the rating tokens)")
    rows = personalised_outputs(run, quick)
    print("| user | movie | true rating | base model predicts | personalised predicts |\n|---|---|---:|---:|---:|")
    for r in rows:
        movie = next((ln[len("movie: "):] for ln in r["prompt"].split("\n") if ln.startswith("movie: ")), "")[:50]
        print(f"| {r['user']} | {movie} | {r['target']} | {r['base']} | {r['proper']} |")
    print(f"\nfree text, one batch, the same prompt for every user: {FREE_PROMPT!r}")
    for r in free_text(run, quick, new_tokens=8 if quick else 24):
        print(f"  [{r['user']}] {r['text']!r}")

    n, new = (4, 4) if quick else (16, 32)
    _banner(f"4. speed: {n} prompts from {n} users, {new} new tokens, greedy (median of interleaved runs, here)")
    t = generation_speed(n, new, quick, reps=1 if quick else 3)
    print("| provider | s | x base time |\n|---|---:|---:|")
    for name, s in t.items():
        print(f"| {name} | {s:.2f} | {s / t['base']:.2f} |")
    print(f"\nproper is {t['peft mixed batch'] / t['proper']:.2f}x faster than peft's mixed-adapter batch "
          f"and costs {t['proper'] / t['base']:.2f}x the base model's own generate.")
    return 0
