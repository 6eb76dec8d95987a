"""Multi-user generation speed on the embedded SmolLM2-135M: base model vs proper vs peft's mixed-adapter batch.

    python benchmarks/bench_generate.py                     # 16 prompts / 16 users, 32 new tokens, greedy
    python benchmarks/bench_generate.py --quick             # a smoke run (4 prompts, 4 tokens, 1 rep)

Providers, all on the same prompts with left padding and exactly --new-tokens new tokens (EOS suppressed, so
every provider does the same work):
    base          the model's own generate
    proper[B]     proper with user rank 16 + K=8 experts of rank 16, top-2, LoRA-aware router, all seven Llama
                  projections, one user per prompt; once per routed_lora backend B available on this CPU
    proper[B,bf16]  the same adapters held in bf16 (ProperConfig(adapter_dtype="bfloat16")), first backend only
    peft          peft's mixed-adapter batch (adapter_names=...) with one rank-16 adapter per user
    proper[cpu,pack-per-call]  (--ablations) proper[cpu] with the experts' B packed by every kernel call instead
                  of once per batch by the bound call (the same bits)
Every provider runs --reps times, interleaved (base, proper..., peft, then the reverse order, ...) so load changes
on a shared machine hit them alike; the verdicts use the median of each round's ratio to that round's base
(proper.bench.timing.paired_ratios, with a bootstrap interval), measured in this one run. Goals (issue 17):
proper <= 1.35x base and >= 2.3x faster than peft. If the goal is missed, a torch.profiler table of one proper
generate is written too (where the time goes). Results: <out>/bench_generate.json, .md and .png.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict

import torch

import proper
import proper_kernels as pk

from .serving import LLAMA7, build_peft_mixed, build_proper_serving, demo_prompts
from .timing import interleaved_times, paired_ratios, plot_paired

GOAL_VS_BASE = 1.35
GOAL_VS_PEFT = 2.3


def kernel_split(model, base_run, user_ids, enc, gen_kw, reps: int) -> Dict[str, float]:
    """Seconds of one proper[cpu] generate with and without its kernel: the prepared calls' bound cpu kernel is
    swapped for a no-op (a diagnostic only: the output is then the base model's), timed in the same interleaved
    rounds as the base model's own generate (odd rounds reversed). Each round's differences are paired: the
    kernel's seconds are the median of (with - without), everything else beyond base the median of
    (without - base)."""
    from proper_kernels import cpu as cpu_backend

    real = cpu_backend.bind_forward

    def run(noop: bool):
        cpu_backend.bind_forward = (lambda p, **kw: (lambda x, out: out)) if noop else real
        try:
            with torch.no_grad(), proper.users(model, user_ids):   # a new block: prepared calls are rebuilt
                model.generate(**enc, **gen_kw)
        finally:
            cpu_backend.bind_forward = real

    t = interleaved_times({"base": base_run, "with": lambda: run(False), "without": lambda: run(True)}, reps,
                          warmup=1, alternate=True)
    w, wo, b = (statistics.median(t[k]) for k in ("with", "without", "base"))
    kernel = statistics.median(x - y for x, y in zip(t["with"], t["without"]))
    rest = statistics.median(x - y for x, y in zip(t["without"], t["base"]))
    return {"with_kernel_s": round(w, 4), "without_kernel_s": round(wo, 4), "base_s": round(b, 4),
            "kernel_s": round(kernel, 4), "rest_beyond_base_s": round(rest, 4)}


def goal_verdicts(times: Dict[str, list], providers) -> Dict[str, Dict[str, object]]:
    """Each proper provider's verdict on the goals from the rounds' seconds ``times`` (interleaved_times): its paired
    median ratio to base (steadier on a drifting machine than a ratio of medians), and where peft ran, peft's time
    over proper's paired the same way, with its 95% bootstrap interval."""
    out = {}
    for k in providers:
        v = {"vs_base": round(paired_ratios({"base": times["base"], k: times[k]}, "base")[k]["median"], 3)}
        if "peft" in times:
            pp = paired_ratios({k: times[k], "peft": times["peft"]}, k)["peft"]
            v["peft_over_proper"] = round(pp["median"], 3)
            v["peft_over_proper_ci"] = [round(pp["lo"], 3), round(pp["hi"], 3)]
        v["goal_met"] = v["vs_base"] <= GOAL_VS_BASE and v.get("peft_over_proper", GOAL_VS_PEFT) >= GOAL_VS_PEFT
        out[k] = v
    return out


def profile_one(fn: Callable[[], object], path: Path, rows: int = 25) -> Dict[str, float]:
    """torch.profiler over one call: the op table to `path`, and the share spent inside routed_lora."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    ev = prof.key_averages()
    by_shape = prof.key_averages(group_by_input_shape=True)   # routed_lora vs the base mm, per projection
    path.write_text(ev.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n\n"
                    + by_shape.table(sort_by="cpu_time_total", row_limit=rows, max_name_column_width=30,
                                     max_shapes_column_width=70))
    total = sum(e.self_cpu_time_total for e in ev)
    routed = sum(e.cpu_time_total for e in ev if e.key == "proper::routed_lora")
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return {"total_ms": total / 1e3, "routed_lora_ms": routed / 1e3, "routed_lora_share": routed / max(total, 1),
            "matmul_self_share": mm / max(total, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_results", help="folder for bench_generate.json / .md")
    ap.add_argument("--prompts", type=int, default=16, help="prompts = distinct users")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", nargs="*", default=None,
                    help="routed_lora backends for proper (default: every one available on CPU)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16-adapter provider")
    ap.add_argument("--kernel-split", action="store_true",
                    help="also time proper[cpu] with its kernel call replaced by a no-op: kernel vs the rest")
    ap.add_argument("--ablations", action="store_true",
                    help="also time proper[cpu] with the experts' B packed in every kernel call (the kernel before "
                         "the bound call packed it once per batch)")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="profile one proper generate when the goal is missed (auto) or always")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 prompts, 4 tokens, 1 rep")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice); 1 is far steadier on a CPU shared with other jobs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.new_tokens, args.reps = 4, 4, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backends = args.backends or [b for b in pk.available_backends("cpu") if b in ("cpu", "torch")]

    base, tok = proper.load_smollm2()
    tok.padding_side = "left"   # this benchmark's own tokenizer copy: batched generation pads left
    enc = tok(demo_prompts(args.prompts), return_tensors="pt", padding=True)
    user_ids = torch.arange(args.prompts)
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)

    runs: Dict[str, Callable[[], torch.Tensor]] = {"base": lambda: base.generate(**enc, **gen_kw)}
    models = {b: build_proper_serving(base, args.prompts, b, copy_base=True) for b in backends}
    if backends and not args.no_bf16:   # the first backend again, its adapters held in bf16
        models[f"{backends[0]},bf16"] = build_proper_serving(base, args.prompts, backends[0], copy_base=True,
                                                             adapter_dtype="bfloat16")
    for name, m in models.items():
        def run_proper(m=m):
            with proper.users(m, user_ids):
                return m.generate(**enc, **gen_kw)

        runs[f"proper[{name}]"] = run_proper
    if args.ablations and "cpu" in models:   # the experts' B packed by every kernel call, not once per batch
        from proper_kernels import cpu as cpu_backend

        def run_pack_per_call(m=models["cpu"], bind=cpu_backend.bind_forward):
            cpu_backend.bind_forward = lambda p: bind(p, pack_experts=False)
            try:
                with proper.users(m, user_ids):     # a new block: its prepared calls bind without the packed B
                    return m.generate(**enc, **gen_kw)
            finally:
                cpu_backend.bind_forward = bind

        runs["proper[cpu,pack-per-call]"] = run_pack_per_call
    if not args.no_peft:
        pm = build_peft_mixed(base, args.prompts, copy_base=True)
        names = [f"u{u}" for u in range(args.prompts)]
        runs["peft"] = lambda: pm.generate(**enc, **gen_kw, adapter_names=names)

    with torch.no_grad():
        times = interleaved_times(runs, args.reps, warmup=1, progress=True, alternate=True)
        first = next(iter(models.values())) if models else None
        if first is not None:     # sanity: distinct users really get different continuations
            with proper.users(first, user_ids):
                toks = first.generate(**enc, **gen_kw)[:, enc.input_ids.shape[1]:]
            distinct = len({tuple(t.tolist()) for t in toks})

    med = {k: statistics.median(v) for k, v in times.items()}
    paired = paired_ratios(times, "base")
    res = {"case": {"model": "SmolLM2-135M-Instruct (fp32)", "prompts": args.prompts, "users": args.prompts,
                    "new_tokens": args.new_tokens, "prompt_tokens_padded": int(enc.input_ids.shape[1]),
                    "greedy": True, "targets": list(LLAMA7), "proper": "user r16 + K=8 experts r16, top-2, "
                    "LoRA-aware router", "peft": f"{args.prompts} adapters r16 mixed batch", "reps": args.reps},
           "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "backends_available": pk.available_backends("cpu")},
           "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
           "median_s": {k: round(v, 4) for k, v in med.items()},
           "ratio_vs_base": {k: round(v / med["base"], 3) for k, v in med.items()},
           "paired_vs_base": {k: {q: round(x, 3) for q, x in v.items()} for k, v in paired.items()},
           "goals": {"proper_vs_base_max": GOAL_VS_BASE, "peft_over_proper_min": GOAL_VS_PEFT}}
    if first is not None:
        res["distinct_user_outputs"] = distinct
    res["verdicts"] = verdicts = goal_verdicts(times, [f"proper[{b}]" for b in models])

    if args.kernel_split and "cpu" in models:
        res["kernel_split"] = kernel_split(models["cpu"], runs["base"], user_ids, enc, gen_kw, args.reps)

    missed = [k for k, v in verdicts.items() if not v["goal_met"]]
    if models and (args.profile == "always" or (args.profile == "auto" and missed)):
        b = (missed[0] if missed else f"proper[{backends[0]}]")[len("proper["):-1]
        m = models[b]

        def one():
            with torch.no_grad(), proper.users(m, user_ids):
                m.generate(**enc, **gen_kw)

        table = f"bench_generate_profile_{b.replace(',', '_')}.txt"
        res["profile"] = {"backend": b, **profile_one(one, out / table), "table": table}
        pb = profile_one(lambda: base.generate(**enc, **gen_kw), out / "bench_generate_profile_base.txt")
        res["profile"]["base_total_ms"] = pb["total_ms"]

    (out / "bench_generate.json").write_text(json.dumps(res, indent=2))
    plot_paired(paired, out / "bench_generate.png", f"SmolLM2 generate, {args.prompts} users x {args.new_tokens} new "
                f"tokens, {torch.get_num_threads()} threads", goal=GOAL_VS_BASE)
    md = markdown(res)
    (out / "bench_generate.md").write_text(md)
    print(md)
    return 0


def markdown(res) -> str:
    c = res["case"]
    lines = [f"# Multi-user generation: {c['model']}", "",
             f"{c['prompts']} prompts from {c['users']} distinct users, {c['new_tokens']} new tokens each, greedy, "
             f"left padding to {c['prompt_tokens_padded']} tokens; adapted: {', '.join(c['targets'])}. "
             f"proper: {c['proper']}; peft: {c['peft']}. Median of {c['reps']} interleaved reps, "
             f"{res['machine']['threads']} threads, {res['date']}.", "",
             "| provider | median s | x base | paired x base [95%] |", "|---|---:|---:|---:|"]
    for k, v in res["median_s"].items():
        pr = res.get("paired_vs_base", {}).get(k)
        paired = f"{pr['median']:.2f} [{pr['lo']:.2f}, {pr['hi']:.2f}]" if pr else "-"
        lines.append(f"| {k} | {v:.3f} | {res['ratio_vs_base'][k]:.2f} | {paired} |")
    lines += ["", "Odd rounds run the providers in reverse order. x base: ratio of medians; paired: the median of "
              "each round's ratio to that round's base (the verdicts use it), with a 95% bootstrap interval; peft / "
              "proper is paired the same way (peft's time over proper's in each round)."]
    lines += ["", f"Goals: proper <= {GOAL_VS_BASE}x base, peft / proper >= {GOAL_VS_PEFT}.", ""]
    for k, v in res["verdicts"].items():
        peft = (f", peft / proper = {v['peft_over_proper']:.2f} [{v['peft_over_proper_ci'][0]:.2f}, "
                f"{v['peft_over_proper_ci'][1]:.2f}]" if "peft_over_proper" in v else "")
        lines.append(f"- {k}: {v['vs_base']:.2f}x base{peft}: goal {'met' if v['goal_met'] else 'MISSED'}")
    if "kernel_split" in res:
        ks = res["kernel_split"]
        rest = ks.get("rest_beyond_base_s", ks["without_kernel_s"] - res["median_s"]["base"])
        lines += ["", f"Kernel split of proper[cpu] (its kernel call swapped for a no-op, interleaved with base): "
                  f"{ks['with_kernel_s']:.3f} s with, {ks['without_kernel_s']:.3f} s without: the kernel "
                  f"{ks['kernel_s']:.3f} s, everything else {rest:.3f} s beyond base (medians of each round's "
                  f"differences)."]
    if "profile" in res:
        p = res["profile"]
        lines += ["", f"Profile of one proper[{p['backend']}] generate: {p['total_ms']:.0f} ms of CPU op time "
                  f"(base: {p['base_total_ms']:.0f} ms); op table: {p['table']}. Under no_grad the layers call the "
                  f"kernel through prepared calls, not the custom op, so the kernel's time is not an op row there."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
