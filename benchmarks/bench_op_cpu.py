"""Benchmark of the routed_lora CPU backend against the torch reference and a naive per-adapter loop.

    python benchmarks/bench_op_cpu.py [--out bench_results/] [--rounds 9] [--quick]

One layer, d_in = d_out = 2048, K = 8 group experts of rank 16 with top-2 gates, user adapters of rank 16, fp32:

  decode   64 tokens from 64 distinct users (one token each)
  prefill  2048 tokens from 16 users (128-token sequences); gates from the user-aware router: one top-2 gate
           vector per user, broadcast to its tokens (as in PROPER)
  prefill_token_gates  the same with an independent top-2 gate vector per token (extra, harder case)

Providers: "torch" (the reference backend), "naive" (a Python loop over the experts and the distinct users, each
a pair of torch matmuls on the tokens that use it) and "cpu" (the compiled backend).

Measured in the same run, so the ratios hold on a shared, noisy machine:
  * read bandwidth: a 512 MiB fp32 tensor's .sum(); the byte floor of a case is the bytes the op must read
    (x, the selected experts' A and B, each distinct user's A[:r] and B[:, :r], gates / ids / weights) divided
    by it. Each provider cycles through several independent copies of the problem (more bytes than the L3
    cache), so the weights come from memory as in a real model, not from cache.
  * fp32 GEMM rate: torch.mm of the base layer itself ([T, 2048] x [2048, 2048], T = 2048); "% GEMM" is the
    FLOPs really needed (the 2 selected experts + the user adapter per token; x3 for forward + backward) over
    the time, relative to that rate.
Every timing is the median of --rounds rounds; providers are interleaved within a round.
Goals (issue 4): decode >= 60% of the byte floor and >= 3x faster than naive; prefill >= 3x faster than naive
and >= 40% of the GEMM rate.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import proper_kernels as pk  # noqa: E402
from proper_kernels.baselines import naive_loop  # noqa: E402

D_IN = D_OUT = 2048
K, R_E, R_U, TOP_K = 8, 16, 16, 2
EXPERT_SCALE = 2.0   # alpha / r = 32 / 16
USER_SCALE = 2.0
DIFF = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_weight")
CASES = {
    "decode": dict(T=64, U=64, gate_mode="user"),
    "prefill": dict(T=2048, U=16, gate_mode="user"),
    "prefill_token_gates": dict(T=2048, U=16, gate_mode="token"),
}


# ------------------------------------------------------------------------------------------------ problems
def make_problem(name: str, seed: int, dtype=torch.float32):
    spec = CASES[name]
    T, U = spec["T"], spec["U"]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    x = rnd(T, D_IN)
    ea, eb = rnd(K, R_E, D_IN, scale=D_IN ** -0.5), rnd(K, D_OUT, R_E, scale=R_E ** -0.5)
    ua, ub = rnd(U, R_U, D_IN, scale=D_IN ** -0.5), rnd(U, D_OUT, R_U, scale=R_U ** -0.5)
    if name == "decode":
        ids = torch.randperm(U, generator=g)[:T]
    else:
        ids = torch.arange(U).repeat_interleave(T // U)          # one sequence per user
    rows = U if spec["gate_mode"] == "user" else T
    logits = torch.randn(rows, K, generator=g)
    gv = torch.softmax(logits, -1)
    gv = gv * torch.zeros_like(gv).scatter(1, gv.topk(TOP_K, -1).indices, 1.0)
    gates = gv[ids] if spec["gate_mode"] == "user" else gv
    w = torch.rand(T, generator=g)
    return dict(x=x, expert_a=ea, expert_b=eb, gates=gates.to(dtype), user_a=ua, user_b=ub, user_ids=ids,
                expert_scale=EXPERT_SCALE, user_scale=USER_SCALE, user_weight=w.to(dtype))


def needed_bytes(p) -> int:
    """Bytes the op must read: x, each selected expert's A and B, each distinct user's A[:r] and B[:, :r]."""
    es = p["x"].element_size()
    sel = int((p["gates"] != 0).any(0).sum())
    users = int(torch.unique(p["user_ids"][p["user_ids"] >= 0]).numel())
    T = p["x"].shape[0]
    return (p["x"].numel() * es + sel * R_E * (D_IN + D_OUT) * es + users * R_U * (D_IN + D_OUT) * es
            + p["gates"].numel() * p["gates"].element_size() + T * 8 + T * p["user_weight"].element_size())


def needed_flops(p) -> float:
    """Forward FLOPs of the selected experts and the user adapter (shrink + expand), per token."""
    nsel = int((p["gates"] != 0).sum())
    T = p["x"].shape[0]
    return 2.0 * (nsel * R_E + T * R_U) * (D_IN + D_OUT)


# ------------------------------------------------------------------------------------------------ providers
def routed(backend):
    # check_values=False as the model layer calls it (ids are validated once per batch, not once per layer)
    def fn(x, expert_a, expert_b, gates, user_a, user_b, user_ids, **kw):
        return pk.routed_lora(x, expert_a, expert_b, gates, user_a, user_b, user_ids, backend=backend,
                              check_values=False, **kw)
    return fn


PROVIDERS = {"torch": routed("torch"), "naive": naive_loop, "cpu": routed("cpu")}


def _call(fn, p):
    args = [p[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
    kw = {k: p[k] for k in ("expert_scale", "user_scale", "user_weight")}
    return fn(*args, **kw)


def make_step(fn, problems, train: bool):
    """A callable running one forward (or forward + backward) on the next copy of the problem."""
    state = {"i": 0}
    if train:
        problems = [{k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in p.items()}
                    for p in problems]
        gos = [torch.randn(p["x"].shape[0], D_OUT, dtype=p["x"].dtype) for p in problems]

    def step():
        p = problems[state["i"] % len(problems)]
        state["i"] += 1
        if not train:
            with torch.no_grad():
                return _call(fn, p)
        y = _call(fn, p)
        leaves = [p[k] for k in DIFF]
        return torch.autograd.grad(y, leaves, gos[(state["i"] - 1) % len(problems)])
    return step


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU time of this process; 1 thread only)


def time_once(step) -> float:
    t0 = CLOCK()
    step()
    return CLOCK() - t0


# ------------------------------------------------------------------------------------------- machine rates
_PROBES = {}


def read_bandwidth_gbs(mib: int = 512) -> float:
    """One sample of the read bandwidth: .sum() of a tensor far larger than the caches."""
    t = _PROBES.get("bw")
    if t is None:
        t = _PROBES["bw"] = torch.ones(mib * 1024 * 1024 // 4)
        t.sum()
    t0 = CLOCK()
    t.sum()
    return t.numel() * 4 / (CLOCK() - t0) / 1e9


def gemm_gflops(m: int = 2048, k: int = D_IN, n: int = D_OUT) -> float:
    """One sample of the fp32 GEMM rate: torch.mm of the base layer's own size."""
    ab = _PROBES.get("mm")
    if ab is None:
        ab = _PROBES["mm"] = (torch.randn(m, k), torch.randn(k, n))
        torch.mm(*ab)
    t0 = CLOCK()
    torch.mm(*ab)
    return 2.0 * m * k * n / (CLOCK() - t0) / 1e9


# --------------------------------------------------------------------------------------------------- main
def run(args):
    torch.manual_seed(0)
    env = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_isa": None, "clock": args.clock,
        "gc_freeze": args.gc_freeze,
        "machine": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg(),
    }
    from proper_kernels import cpu as cpu_backend
    try:
        env["cpu_isa"] = cpu_backend.isa()
    except Exception as e:  # noqa: BLE001
        env["cpu_isa"] = f"unavailable: {e}"
    has_cpu = cpu_backend.unavailable_reason(torch.device("cpu")) is None  # (without importing other backends)
    providers = [n for n in args.providers.split(",") if n != "cpu" or has_cpu]
    if "naive" not in providers:
        providers.insert(0, "naive")
    cases = args.cases.split(",")
    rows = []
    rates = {"bandwidth_gbs": [], "gemm_gflops": []}
    for name in cases:
        spec = CASES[name]
        per_copy = needed_bytes(make_problem(name, 0))
        copies = max(2, math.ceil(args.cold_bytes / per_copy))
        problems = [make_problem(name, s) for s in range(copies)]
        p0 = problems[0]
        if args.check and "cpu" in providers:
            ref = _call(PROVIDERS["torch"], p0)
            got = _call(PROVIDERS["cpu"], p0)
            nai = _call(PROVIDERS["naive"], p0)
            scale = ref.abs().max().item()
            assert (got - ref).abs().max().item() <= 1e-4 * scale, "cpu backend disagrees with the reference"
            assert (nai - ref).abs().max().item() <= 1e-4 * scale, "naive loop disagrees with the reference"
        for train in (False, True):
            steps = {n: make_step(PROVIDERS[n], problems, train) for n in providers}
            for n in providers:             # warm up (one pass over the copies)
                for _ in range(min(copies, 3)):
                    steps[n]()
            if args.gc_freeze:
                # as a serving process does once warmed up: the collector stops re-scanning the long-lived
                # objects (torch's, the problems'), whose scans would be charged to whichever call triggers them
                gc.collect()
                gc.freeze()
            times = {n: [] for n in providers}
            bws, gfs = [], []
            for _ in range(args.rounds):  # providers interleaved, and the machine's rates probed every round
                for n in providers:
                    times[n].append(time_once(steps[n]))
                bws.append(read_bandwidth_gbs())
                gfs.append(gemm_gflops())
            bw, gf = statistics.median(bws), statistics.median(gfs)
            rates["bandwidth_gbs"].append(bw)
            rates["gemm_gflops"].append(gf)
            for n in providers:
                ms = 1e3 * statistics.median(times[n])
                rows.append({"case": name, "mode": "fwd+bwd" if train else "fwd", "provider": n,
                             "T": spec["T"], "users": spec["U"], "gates": spec["gate_mode"],
                             "ms": ms, "ms_min": 1e3 * min(times[n]), "bytes": per_copy,
                             "flops": needed_flops(p0) * (3 if train else 1), "copies": copies,
                             "bandwidth_gbs": bw, "gemm_gflops": gf})
    for r in rows:
        naive = next(q for q in rows if q["case"] == r["case"] and q["mode"] == r["mode"] and q["provider"] == "naive")
        r["speedup_vs_naive"] = naive["ms"] / r["ms"]
        r["byte_floor_ms"] = r["bytes"] / (r["bandwidth_gbs"] * 1e9) * 1e3
        r["pct_byte_floor"] = 100.0 * r["byte_floor_ms"] / r["ms"] if r["mode"] == "fwd" else None
        r["gflops"] = r["flops"] / (r["ms"] * 1e-3) / 1e9
        r["pct_gemm"] = 100.0 * r["gflops"] / r["gemm_gflops"]
    bw = statistics.median(rates["bandwidth_gbs"])
    gf = statistics.median(rates["gemm_gflops"])
    env.update(bandwidth_gbs=bw, gemm_gflops=gf, rates=rates, loadavg_end=os.getloadavg())
    return rows, env


def goals(rows):
    out = []
    get = lambda c, m, p: next((r for r in rows if (r["case"], r["mode"], r["provider"]) == (c, m, p)), None)  # noqa
    d = get("decode", "fwd", "cpu")
    if d:
        out.append(("decode: >= 60% of the byte floor", d["pct_byte_floor"] >= 60, f"{d['pct_byte_floor']:.0f}%"))
        out.append(("decode: >= 3x faster than naive", d["speedup_vs_naive"] >= 3, f"{d['speedup_vs_naive']:.1f}x"))
    pf = get("prefill", "fwd", "cpu")
    if pf:
        out.append(("prefill: >= 3x faster than naive", pf["speedup_vs_naive"] >= 3, f"{pf['speedup_vs_naive']:.1f}x"))
        out.append(("prefill: >= 40% of the GEMM rate", pf["pct_gemm"] >= 40, f"{pf['pct_gemm']:.0f}%"))
    return out


def markdown(rows, env) -> str:
    lines = [
        f"routed_lora CPU benchmark: d_in = d_out = {D_IN}, K = {K} experts of rank {R_E} (top-{TOP_K}), user rank "
        f"{R_U}, fp32; {env['threads']} threads, kernels: {env['cpu_isa']}; torch {env['torch']}; "
        f"{'CPU time' if env['clock'] == 'cpu' else 'wall-clock time'}",
        f"measured in this run (probed every round, median): read bandwidth {env['bandwidth_gbs']:.1f} GB/s, "
        f"fp32 GEMM {env['gemm_gflops']:.0f} GFLOP/s (torch.mm 2048x2048x2048); each row uses the probes of its "
        f"own rounds; load average {env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}",
        "",
        "| case | mode | provider | ms (median) | vs naive | % byte floor | GFLOP/s needed | % GEMM rate |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        pb = "" if r["pct_byte_floor"] is None else f"{r['pct_byte_floor']:.0f}%"
        lines.append(f"| {r['case']} | {r['mode']} | {r['provider']} | {r['ms']:.2f} | {r['speedup_vs_naive']:.2f}x | "
                     f"{pb} | {r['gflops']:.1f} | {r['pct_gemm']:.0f}% |")
    lines += ["", "bytes the op must read: " + ", ".join(
        f"{c} {next(r['bytes'] for r in rows if r['case'] == c) / 1e6:.1f} MB (floor "
        f"{next(r['byte_floor_ms'] for r in rows if r['case'] == c and r['mode'] == 'fwd'):.2f} ms)"
        for c in dict.fromkeys(r["case"] for r in rows))]
    g = goals(rows)
    if g:
        lines += ["", "| goal | met | measured |", "| --- | --- | --- |"]
        lines += [f"| {n} | {'yes' if ok else 'NO'} | {v} |" for n, ok, v in g]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_results", help="output directory (JSON + markdown)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per provider (median reported)")
    ap.add_argument("--cases", default="decode,prefill,prefill_token_gates")
    ap.add_argument("--providers", default="torch,naive,cpu", help="comma-separated subset (naive always runs)")
    ap.add_argument("--cold-bytes", type=float, default=128e6,
                    help="cycle through enough problem copies to read at least this many bytes (defeats the L3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, decode + prefill only")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: CPU time of the process (needs --threads 1), which leaves out "
                         "the time other processes hold the core on a shared machine")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    ap.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                    help="leave the long-lived objects to the Python garbage collector's full scans")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            ap.error("--clock cpu measures one thread: add --threads 1")
        CLOCK = time.process_time
    if args.quick:
        args.rounds = 3
        args.cases = "decode,prefill"
    rows, env = run(args)
    if args.gc_freeze:
        gc.unfreeze()
    md = markdown(rows, env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / "bench_op_cpu.json").write_text(json.dumps({"env": env, "rows": rows, "goals": [
        {"goal": n, "met": ok, "measured": v} for n, ok, v in goals(rows)], "time": stamp}, indent=2))
    (out / "bench_op_cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
