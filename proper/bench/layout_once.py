"""What building the token layout once per batch saves: SmolLM2 generate for 16 users, the layout built once by the
users() context and shared by every adapted layer, vs rebuilt in every layer call (what each layer did before).

    python -m benchmarks.bench_layout_once --out benchmarks/results

Both set-ups run the same model (the issue-5 serving set-up: K = 8 experts r16 top-2 + user r16 on all seven
projections) in interleaved rounds; "per-layer" patches the context so that every routed_lora call gets token ids
and a layout built for it alone. The compiled CPU backend sorts tokens by user in C++ itself, so on a CPU the
difference is only the metadata work (the segment backends, triton and cuda, consume the layout). Also reported:
routed_lora calls per generate and the cost of one layout build at this batch's shapes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import proper
import proper_kernels as pk
from proper import context
from proper.training import truncate_layers

from .serving import build_proper_serving, demo_prompts, generate_once
from .timing import interleaved_times


def _rebuilt_every_call(self, nb, per, device):
    """UserBatch.tokens without its cache: token ids and layout built anew for each layer call."""
    s = self.sample_ids(nb, device)
    ids = s[:, None].expand(nb, per).reshape(nb * per)
    return context.TokenBatch(ids, pk.token_layout(ids, self.num_users) if self.has_known else None)


def count_calls(model, tok, prompts, users, new_tokens) -> int:
    n = 0
    real = context.UserBatch.tokens

    def counting(self, *a):
        nonlocal n
        n += 1
        return real(self, *a)

    context.UserBatch.tokens = counting
    try:
        generate_once(model, tok, prompts, users, new_tokens)
    finally:
        context.UserBatch.tokens = real
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--num-layers", type=int, default=None, help="truncate SmolLM2 (smoke runs)")
    args = p.parse_args(argv)
    base, tok = proper.load_smollm2()
    if args.num_layers:
        truncate_layers(base, args.num_layers)
    model = build_proper_serving(base, args.users)
    prompts, users = demo_prompts(args.users), list(range(args.users))
    real = context.UserBatch.tokens

    def once():
        generate_once(model, tok, prompts, users, args.new_tokens)

    def per_layer():
        context.UserBatch.tokens = _rebuilt_every_call
        try:
            generate_once(model, tok, prompts, users, args.new_tokens)
        finally:
            context.UserBatch.tokens = real

    times = interleaved_times({"layout once per batch": once, "layout per layer call": per_layer}, args.reps,
                              warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    calls = count_calls(model, tok, prompts, users, args.new_tokens)
    ids = torch.arange(args.users).repeat_interleave(12)          # a prefill-sized batch of this run
    t0 = time.perf_counter()
    for _ in range(200):
        pk.token_layout(ids, args.users)
    build_us = (time.perf_counter() - t0) / 200 * 1e6
    forwards = args.new_tokens
    res = {"users": args.users, "new_tokens": args.new_tokens, "reps": args.reps, "median_s": med,
           "routed_lora_calls_per_generate": calls, "forwards_per_generate": forwards,
           "layer_calls_per_forward": calls / forwards, "token_layout_build_us": build_us,
           "saved_per_forward_ms": (med["layout per layer call"] - med["layout once per batch"]) / forwards * 1e3,
           "ratio_per_layer_vs_once": med["layout per layer call"] / med["layout once per batch"],
           "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_layout_once.json").write_text(json.dumps(res, indent=2))
    md = ("| set-up | median s per generate |\n|---|---:|\n" +
          "".join(f"| {k} | {v:.3f} |\n" for k, v in med.items()) +
          f"\n{calls} routed_lora calls per generate ({calls / forwards:.0f} per forward); one token_layout build "
          f"{build_us:.0f} us; saved per forward {res['saved_per_forward_ms']:.2f} ms "
          f"(per-layer / once = {res['ratio_per_layer_vs_once']:.3f}).\n")
    (out / "bench_layout_once.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
