"""One SmolLM2-135M decode step of the op alone: the 210 routed_lora calls (30 layers x 7 projections) of 16 tokens
from 16 users, K = 8 experts r16 top-2 + r16 users, each layer's adapters its own tensors (469 MB fp32: beyond the
caches, as in a model), against the byte floor measured in the same rounds.

    python -m benchmarks.bench_decode_step --out benchmarks/results/decode_step

Providers, per dtype (fp32, bf16 adapters; the delta added into an fp32 out, as the layer does), interleaved:
    bound          the cpu backend's bound call (proper_kernels.cpu.bind_forward: the experts' B packed once)
    pack-per-call  the same kernel given no packed B: every call packs a block of B_k^T per expand item
    stream         torch's sum of one fp32 tensor of as many bytes: what reading them costs here (the floor)
Each round calls every provider once over all 210 problems; medians over the rounds, ratios within this run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch

from .timing import interleaved_times, write_results

# SmolLM2-135M: hidden 576, kv 192, MLP 1536, 30 layers; (d_in, d_out) of q, k, v, o, gate, up, down
PROJECTIONS = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))


def decode_problems(dtype: torch.dtype, layers: int = 30, users: int = 16, experts: int = 8, rank: int = 16,
                    seed: int = 0) -> List[Dict[str, object]]:
    """The routed_lora arguments of every adapted layer call of one decode step (one token per user)."""
    gen = torch.Generator().manual_seed(seed)
    probs = []
    for _ in range(layers):
        for d_in, d_out in PROJECTIONS:
            def rnd(*s):
                return (torch.randn(*s, generator=gen) * 0.02).to(dtype)
            top = torch.randn(users, experts, generator=gen).topk(2, -1)
            gates = torch.zeros(users, experts).scatter(1, top.indices, top.values.softmax(-1))
            probs.append(dict(x=rnd(users, d_in), expert_a=rnd(experts, rank, d_in), expert_b=rnd(experts, d_out, rank),
                              gates=gates, user_a=rnd(users, rank, d_in), user_b=rnd(users, d_out, rank),
                              user_ids=torch.arange(users), out=torch.zeros(users, d_out)))
    return probs


def run(dtypes=("fp32", "bf16"), rounds: int = 9, layers: int = 30) -> List[Dict[str, object]]:
    from proper_kernels import cpu
    from proper_kernels.checks import validate

    rows = []
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        probs = decode_problems(dtype, layers)
        bound, unpacked, weights = [], [], []
        for q in probs:
            p = validate(q["x"], q["expert_a"], q["expert_b"], q["gates"], q["user_a"], q["user_b"], q["user_ids"])
            bound.append((cpu.bind_forward(p), q["x"], q["out"]))
            unpacked.append((cpu.bind_forward(p, pack_experts=False), q["x"], q["out"]))
            weights += [q["expert_a"], q["expert_b"], q["user_a"], q["user_b"]]
        nbytes = sum(w.numel() * w.element_size() for w in weights)

        def calls(lst):
            def go():
                for f, x, out in lst:
                    f(x, out)
            return go

        # the floor: as many bytes in one fp32 tensor, summed by torch (one call: no per-piece dispatch, and not
        # torch's bf16 sum, which is compute-bound here)
        flat = torch.ones(nbytes // 4)

        def stream():
            flat.sum()

        with torch.no_grad():
            t = interleaved_times({"bound": calls(bound), "pack-per-call": calls(unpacked), "stream": stream},
                                  rounds, warmup=1)
        med = {k: statistics.median(v) for k, v in t.items()}
        for k, v in med.items():
            rows.append({"dtype": name, "provider": k, "ms": round(v * 1e3, 3), "adapter_mb": round(nbytes / 1e6, 1),
                         "gb_per_s": round(nbytes / v / 1e9, 2), "floor_over_time": round(med["stream"] / v, 3),
                         "x_vs_bound": round(v / med["bound"], 3)})
    return rows


def markdown(rows, env) -> str:
    lines = ["# One SmolLM2-135M decode step of the op (210 calls, 16 users, K = 8 r16 top-2 + r16 users)", "",
             f"{env['threads']} threads, cpu kernels {env['cpu_isa']}, torch {env['torch']}, {env['date']}; medians "
             f"of {env['rounds']} interleaved rounds. `floor / time`: as many bytes read by torch's sum of one fp32 "
             f"tensor in the same rounds, over this provider's time.", "",
             "| dtype | provider | ms | adapter MB | GB/s | floor / time | x vs bound |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['provider']} | {r['ms']:.2f} | {r['adapter_mb']:.0f} | "
                     f"{r['gb_per_s']:.1f} | {r['floor_over_time']:.2f} | {r['x_vs_bound']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_results/decode_step")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 layers (in cache: not a measurement), 2 rounds")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated among fp32, bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    bad = [d for d in args.dtypes.split(",") if d not in ("fp32", "bf16")]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; expected some of ['fp32', 'bf16']")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from proper_kernels import cpu
    reason = cpu.unavailable_reason(torch.device("cpu"))
    if reason:
        ap.error(f"the cpu backend is needed: {reason}")
    layers = 2 if args.quick else 30
    rounds = 2 if args.quick else args.rounds
    rows = run(tuple(args.dtypes.split(",")), rounds, layers)
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_isa": cpu.isa(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds, "layers": layers}
    write_results(args.out, "decode_step", {"env": env, "rows": rows}, markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
