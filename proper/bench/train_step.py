"""One training step (forward + backward) of SmolLM2-135M on a mixed-user batch: ours vs peft vs base.

    python -m benchmarks.bench_train_step --out bench_results/train_step

Batch: 16 users x 64 tokens. Providers, all on the same model and batch, timed in one run:
  base         the frozen base model, forward + backward to the input embeddings (the activation-gradient
               work every adapter method pays; no weight gradients)
  peft-single  one peft LoRA (r = 16) on all 7 projections for the whole batch: the cost of a plain adapter
  peft-loop    16 peft adapters, one per user, trained by looping over users (peft cannot train a
               mixed-adapter batch): one forward + backward per user
  ours         proper's user stage: K = 8 frozen experts (r = 16, top-2), a user LoRA (r = 16) per user and the
               LoRA-aware router, all 7 projections, the whole mixed batch in one forward + backward
With --ablations also ours-recompute, ours-gather and ours-router-autograd: ours (the same model) with one
training-step saving switched off each (see ablation_providers), timed in the same rounds.
Goal (issue 17): ours <= 1.22x base (16 x 64), <= 1.25x and >= 3.7x faster than peft-loop (64 x 16).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

import proper

from .timing import interleaved_times, paired_ratios, peak_memory_mb, plot_paired

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOALS = {(16, 64): 1.22, (64, 16): 1.25}   # issue 17: ours / base at (users, tokens per user)


def _batch(tok, n_users: int, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, tok.vocab_size - 10 if tok is not None else 40000, (n_users, seq), generator=gen)


def _base(n_users, seq):
    model, tok = proper.load_smollm2()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, _batch(tok, n_users, seq)


def _step(model, ids, embeds_grad: bool = False):
    """forward + backward of the LM loss; the base model's backward flows to its input embeddings."""
    if embeds_grad:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        out = model(inputs_embeds=emb, labels=ids)
    else:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()


def make_providers(n_users: int, seq: int, rank: int = 16, K: int = 8, top_k: int = 2):
    def base():
        model, ids = _base(n_users, seq)
        return lambda: _step(model, ids, embeds_grad=True)

    def ours():
        model, ids = _base(n_users, seq)
        cfg = proper.ProperConfig(num_users=n_users, num_experts=K, expert_rank=rank, user_rank=rank, top_k=top_k,
                                  alpha=2 * rank, target_modules=tuple(TARGETS))
        model = proper.apply_proper(model, cfg)
        _randomise(model)
        proper.set_stage(model, "user")
        model.train()
        user_ids = torch.arange(n_users)

        def step():
            model.zero_grad(set_to_none=True)
            with proper.users(model, user_ids):
                _step(model, ids)
        return step

    def peft_model(n_adapters):
        from peft import LoraConfig, get_peft_model

        model, ids = _base(n_users, seq)
        cfg = lambda: LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)  # noqa: E731
        pm = get_peft_model(model, cfg(), adapter_name="u0")
        for i in range(1, n_adapters):
            pm.add_adapter(f"u{i}", cfg())
        pm.train()
        return pm, ids

    def peft_single():
        pm, ids = peft_model(1)

        def step():
            pm.zero_grad(set_to_none=True)
            _step(pm, ids)
        return step

    def peft_loop():
        pm, ids = peft_model(n_users)

        def step():
            pm.zero_grad(set_to_none=True)
            for u in range(n_users):          # peft trains one adapter at a time
                pm.base_model.set_adapter(f"u{u}")
                _step(pm, ids[u:u + 1])
        return step

    return {"base": base, "ours": ours, "peft-single": peft_single, "peft-loop": peft_loop}


def ablation_providers(ours_step) -> Dict[str, object]:
    """Ours with one of its training-step savings switched off, for a same-run A/B (``--ablations``), each a runner
    of ``ours_step`` itself (the same model and batch: the A/B differs in the switch alone, and no extra model's
    user tables sit in memory):
      ours-recompute  the backward recomputes A x (the forward keeps nothing for it)
      ours-gather     the LoRA-aware router gathers the batch's user rows even when the batch holds the whole table
      ours-router-autograd  the LoRA-aware router's probe response through autograd's own products (P = 2 as an
                      inner dimension of every batched GEMM) instead of its hand-ordered Function
    """
    from proper.context import UserBatch
    from proper.modules import routers
    from proper_kernels import op

    def patched(obj, name, value):
        def run():
            before = obj.__dict__[name]
            setattr(obj, name, value)
            try:
                ours_step()
            finally:
                setattr(obj, name, before)
        return run

    return {"ours-recompute": patched(op, "_saves", lambda p, backend: False),
            "ours-gather": patched(UserBatch, "covers_table", property(lambda self: False)),
            "ours-router-autograd": patched(routers, "_ProbeResponse", AutogradProbeResponse)}


class AutogradProbeResponse:
    """The router's _ProbeResponse products left to torch autograd (the form before the Function): same values;
    the rank masking and scaling around them are the router's own in both."""

    @staticmethod
    def apply(a, b, q):
        return torch.matmul(b, torch.matmul(a, q.t())).transpose(1, 2)


@torch.no_grad()
def _randomise(model):
    """Non-zero adapters and routers, so no multiplication by an all-zero B is skipped anywhere. Only PROPER's own
    tensors: the wrapped layer's `weight` is the base model's (overwriting it, as this did before, gave 'ours' a
    random base model whose logits reached 155 and whose logit gradients were 1% denormal floats, which slowed
    its lm_head GEMM 2-4x)."""
    gen = torch.Generator().manual_seed(0)
    for layer in proper.proper_layers(model).values():
        for p in layer.adapter_tensors().values():
            if p.is_floating_point() and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def suite_rows(quick: bool = False, n_users: int = 16, seq: int = 64, rounds: int = 5,
               ablations: bool = False) -> List[Dict[str, object]]:
    """All providers built first, then timed in interleaved rounds (median per provider), so a burst of load
    on the shared machine hits every provider alike and the ratios stay meaningful."""
    if quick:
        return []      # a SmolLM2 training step per provider takes too long for the quick subset
    steps = {name: make() for name, make in make_providers(n_users, seq).items()}
    if ablations:
        steps.update(ablation_providers(steps["ours"]))
    times = interleaved_times(steps, rounds, warmup=1, progress=True, alternate=True)
    paired = paired_ratios(times, "base")
    rows = []
    for name, fn in steps.items():
        pr = paired[name]
        rows.append({"case": f"train step SmolLM2 {n_users} users x {seq} tokens", "provider": name,
                     "ms": 1e3 * statistics.median(times[name]), "min_ms": 1e3 * min(times[name]), "reps": rounds,
                     "x_vs_base_paired": pr["median"], "x_vs_base_lo": pr["lo"], "x_vs_base_hi": pr["hi"],
                     "peak_mb": peak_memory_mb(fn)})
    base = next(r["ms"] for r in rows if r["provider"] == "base")
    for r in rows:
        r["x_vs_base"] = r["ms"] / base
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/train_step")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--ablations", action="store_true",
                   help="also time ours with each training-step saving switched off (ours-recompute, ours-gather, "
                        "ours-router-autograd)")
    args = p.parse_args(argv)
    rows = suite_rows(False, args.users, args.seq, args.rounds, args.ablations)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(rows, indent=2))
    loop = next(r["ms"] for r in rows if r["provider"] == "peft-loop")
    lines = ["| provider | ms | x vs base | paired x base [95%] | x faster than peft-loop | peak MB |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['provider']} | {r['ms']:.0f} | {r['x_vs_base']:.2f} | {r['x_vs_base_paired']:.2f} "
              f"[{r['x_vs_base_lo']:.2f}, {r['x_vs_base_hi']:.2f}] | {loop / r['ms']:.2f} | {r['peak_mb']:.0f} |"
              for r in rows]
    lines += ["", f"Medians of {args.rounds} interleaved rounds (odd rounds in reverse order); paired: the median of "
              "each round's ratio to that round's base, with a 95% bootstrap interval."]
    (out / "train_step.md").write_text("\n".join(lines) + "\n")
    plot_rows(rows, out / "train_step.png", GOALS.get((args.users, args.seq)))
    print("\n".join(lines))
    return 0


def plot_rows(rows: List[Dict[str, object]], path, goal: Optional[float] = None) -> None:
    """train_step.png: each provider's paired ratio to base with its interval, and the goal (GOALS) as a line."""
    paired = {r["provider"]: {"median": r["x_vs_base_paired"], "lo": r["x_vs_base_lo"], "hi": r["x_vs_base_hi"]}
              for r in rows}
    plot_paired(paired, path, str(rows[0]["case"]), goal=goal)


if __name__ == "__main__":
    sys.exit(main())
