"""What one adapted layer call costs beyond its arithmetic: the per-call overhead (issue 17 asks <= 15 us).

    python -m benchmarks.bench_layer_overhead --out benchmarks/results

A tiny layer (d = 64, one token: a decode step), where every kernel's arithmetic is well under a microsecond, so
the times are overhead. Calls timed interleaved, medians of many reps (2 threads, no_grad, cpu backend if built,
else torch):

    linear       the base nn.Linear module called on x: what the base model pays per layer (module call + F.linear)
    kernel       the backend's own call on prepared arguments, adding into the output (cpu: the C++ kernel
                 through its binding): the floor of any routed_lora call
    op           proper_kernels.routed_lora (the public call) on the same experts (K = 8, top-2), users and
                 layout, check_values off: argument checks, dispatch and the backend
    layer        the ProperLinear module called in the user stage inside users(): base + routing (cached per batch
                 under no_grad) + the op, through a prepared call after the first step
    layer_grad   the same forward with gradients on (routing recomputed, autograd graph built)

Reported: each median, and the layer's own Python (layer - linear - kernel): everything an adapted layer call
adds beyond the base layer and the kernel, the quantity the goal is about.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Dict

import torch
from torch import nn

import proper
from proper_kernels import available_backends, prepare_routed_lora, routed_lora

from .timing import write_results

D, K, R = 64, 8, 16


def _timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def run(rounds: int = 7, reps: int = 2000) -> Dict[str, object]:
    backend = "cpu" if "cpu" in available_backends("cpu") else "torch"
    model = nn.Sequential(nn.Linear(D, D))
    cfg = proper.ProperConfig(num_users=16, num_experts=K, expert_rank=R, user_rank=R, top_k=2,
                              target_modules=r"0", backend=backend)
    proper.apply_proper(model, cfg)
    layer = proper.proper_layers(model)["0"]
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(1, 1, D)
    w = layer.weight.detach().clone()
    ctx = proper.users(model, [3])
    batch = ctx.__enter__()
    try:
        tb = batch.tokens(1, 1, x.device)
        gates = torch.tensor([[0.6, 0.4] + [0.0] * (K - 2)])
        args = dict(user_ranks=None, expert_scale=cfg.expert_scale, user_scale=layer.user_scale,
                    user_weight=torch.ones(1), backend=backend, check_values=False, layout=tb.layout)
        xf = x.reshape(1, D)
        base = nn.Linear(D, D)
        with torch.no_grad():
            base.weight.copy_(w)
        out = torch.zeros(1, 1, D)
        call = prepare_routed_lora(x, layer.expert_a, layer.expert_b, gates, layer.user_a, layer.user_b, tb.ids,
                                   **args)
        run = call._run or (lambda x_, o_: call(x_, out=o_))
        fns = {
            "linear": lambda: base(x),
            "kernel": lambda: run(x, out),
            "op": lambda: routed_lora(xf, layer.expert_a, layer.expert_b, gates, layer.user_a, layer.user_b, tb.ids,
                                      out=out.view(1, D), **args),
            "layer": lambda: layer(x),
        }
        times = {k: [] for k in (*fns, "layer_grad")}
        with torch.no_grad():
            for f in fns.values():
                _timed(f, 200)
        for _ in range(rounds):
            with torch.no_grad():
                for k, f in fns.items():
                    times[k].append(_timed(f, reps))
            times["layer_grad"].append(_timed(lambda: layer(x), reps // 4))
    finally:
        ctx.__exit__(None, None, None)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"backend": backend, "threads": torch.get_num_threads(), "us": med,
            "layer_python_us": med["layer"] - med["linear"] - med["kernel"], "goal_us": 15.0}


def markdown(r: Dict[str, object]) -> str:
    us = r["us"]
    lines = [f"Per adapted-layer call, d = {D}, one token, K = {K} r{R} top-2 + r{R} users, backend {r['backend']}, "
             f"{r['threads']} threads (medians, microseconds):", "", "| call | us |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in us.items()]
    lines += ["", f"The layer's own Python (layer - linear - kernel): **{r['layer_python_us']:.1f} us** (goal <= "
              f"{r['goal_us']:.0f} us); the public routed_lora call's checks and dispatch: "
              f"{us['op'] - us['kernel']:.1f} us beyond the kernel."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=2000)
    args = p.parse_args(argv)
    r = run(args.rounds, args.reps)
    write_results(args.out, "bench_layer_overhead", r, markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
