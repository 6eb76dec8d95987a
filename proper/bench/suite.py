"""Run the benchmark suite: layer-level cases x providers (+ model-level cases), written as JSON lines, a
markdown table and PNG plots; `--regen` rebuilds BENCHMARKS.md from a results folder.

    python -m proper.bench.suite --out benchmarks/results        # the whole suite (benchmarks/run.py: the same)
    proper bench                                                 # the quick subset, from any install
    python -m proper.bench.suite --regen benchmarks/results      # BENCHMARKS.md from saved results

Speed is reported as ratios measured in one run: vs the naive loop, vs peft, vs the byte floor (bytes the op
must read / read bandwidth measured now) and vs the fp32 GEMM rate measured now. The full run adds the cases
beyond the caches in fp32 and bf16 (proper.bench.op_cold: weights from memory, the GEMM rate of each dtype).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
from tqdm import tqdm

from . import op_cold
from .layer_cases import grid, make_inputs, work
from .providers import providers
from .timing import measure, peak_memory_mb

log = logging.getLogger("proper.bench")
HERE = Path(__file__).resolve().parent   # git reports the commit when this runs from a checkout, else None


# ------------------------------------------------------------------------------------------ machine facts
def read_bandwidth_gbs(mb: int = 256) -> float:
    """Read bandwidth of this machine now: a large fp32 sum (bytes read / time)."""
    t = torch.ones(mb * 2**20 // 4)
    ms = measure(lambda: t.sum(), warmup=2, min_reps=5, min_seconds=0.3)["min_ms"]
    return t.numel() * 4 / (ms / 1e3) / 1e9


def gemm_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = measure(lambda: a @ b, warmup=1, min_reps=3, min_seconds=0.3)["min_ms"]
    return 2 * n ** 3 / (ms / 1e3) / 1e9


def environment() -> Dict[str, object]:
    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "machine": f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
            "python": platform.python_version(),
            "versions": {m: version(m) for m in ("torch", "proper_kernels", "triton", "transformers", "peft")}}


# --------------------------------------------------------------------------------------------- the suite
def run_layer_cases(quick: bool, with_peft: bool = True) -> List[Dict[str, object]]:
    bw, gemm = read_bandwidth_gbs(), gemm_gflops()
    log.info("read bandwidth %.1f GB/s, fp32 GEMM %.1f GFLOP/s", bw, gemm)
    provs = providers("cpu", with_peft=with_peft)
    rows = []
    cases = grid(quick)
    timing = dict(warmup=1, min_reps=3, min_seconds=0.2) if quick else dict(warmup=2, min_reps=5, min_seconds=1.0)
    for case in tqdm(cases, desc="layer cases", unit="case"):
        kw = make_inputs(case)
        need = work(case, kw)
        for pname, make in provs.items():
            fn = make(case, kw)
            if fn is None:
                continue
            t = measure(fn, **timing)
            mb = peak_memory_mb(fn)
            floor_ms = need["bytes"] / (bw * 1e9) * 1e3
            rows.append({"kind": "layer", **case.asdict(), "provider": pname, "ms": t["ms"], "peak_mb": mb,
                         "floor_ms": floor_ms, "pct_byte_floor": 100 * floor_ms / t["ms"],
                         "pct_gemm_rate": 100 * need["flops"] / (t["ms"] / 1e3) / (gemm * 1e9),
                         "read_gbs": bw, "gemm_gflops": gemm})
    _add_ratios(rows)
    return rows


def _add_ratios(rows):
    """speedup vs naive loop and vs peft mixed batch, within the same case of the same run."""
    by_case: Dict[str, Dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(r["name"], {})[r["provider"]] = r["ms"]
    for r in rows:
        ref = by_case[r["name"]]
        r["x_vs_naive"] = ref["naive-loop"] / r["ms"] if "naive-loop" in ref else None
        r["x_vs_peft_mixed"] = ref["peft-mixed"] / r["ms"] if "peft-mixed" in ref else None


def run_model_cases(quick: bool) -> List[Dict[str, object]]:
    """Model-level rows (SmolLM2 generate, a mixed-user training step) from the model benchmark modules."""
    rows = []
    for module in ("proper.bench.generate", "proper.bench.train_step"):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            log.warning("skipping %s: %s", module, e)
            continue
        if hasattr(mod, "suite_rows"):
            rows += [{"kind": "model", **r} for r in mod.suite_rows(quick=quick)]
    return rows


# ------------------------------------------------------------------------------------------------ output
def markdown(rows, env) -> str:
    out = [f"Machine: {env['machine']}; torch {env['versions']['torch']}; commit {env['commit']}; "
           f"{env['date']}.", ""]
    layer = [r for r in rows if r["kind"] == "layer"]
    if layer:
        r0 = layer[0]
        out += [f"Layer level (d = {r0['d']}, fp32). Read bandwidth measured in this run: {r0['read_gbs']:.1f} GB/s; "
                f"fp32 GEMM: {r0['gemm_gflops']:.0f} GFLOP/s. `% floor` = byte-floor time / time; `% GEMM` = "
                "needed FLOPs / time / GEMM rate.", "",
                "| case | provider | ms | peak MB | x vs naive loop | x vs peft mixed | % byte floor | % GEMM |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        for r in layer:
            out.append(f"| {r['name']} | {r['provider']} | {r['ms']:.3f} | {r['peak_mb']:.1f} | "
                       f"{fmt(r['x_vs_naive'], '.2f')} | {fmt(r['x_vs_peft_mixed'], '.2f')} | "
                       f"{r['pct_byte_floor']:.0f} | {r['pct_gemm_rate']:.0f} |")
    cold = [r for r in rows if r["kind"] == "cold"]
    if cold:
        out += [""] + op_cold.markdown(cold)
    model = [r for r in rows if r["kind"] == "model"]
    if model:
        out += ["", "Model level:", "", "| case | provider | ms | x vs base | peak MB |", "|---|---|---:|---:|---:|"]
        for r in model:
            out.append(f"| {r['case']} | {r['provider']} | {r['ms']:.1f} | {r.get('x_vs_base', float('nan')):.2f} | "
                       f"{r.get('peak_mb', float('nan')):.0f} |")
    return "\n".join(out) + "\n"


def plots(rows, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    layer = [r for r in rows if r["kind"] == "layer" and r["phase"] == "decode" and r["popularity"] == "distinct"
             and not r["training"] and not r["mixed_ranks"] and r["user_rank"] == 16]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, K in zip(axes, (8, 0)):
        for prov in sorted({r["provider"] for r in layer}):
            pts = sorted((r["n_users"], r["ms"]) for r in layer if r["K"] == K and r["provider"] == prov)
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker="o", label=prov)
        ax.set(xscale="log", yscale="log", xlabel="distinct users in the batch (1 token each)", ylabel="ms",
               title="decode, d=2048, user rank 16, " + ("K=8 experts top-2" if K else "no experts"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speed_vs_users.png", dpi=110)
    plt.close(fig)
    made.append("speed_vs_users.png")

    both = {}
    for r in rows:
        if r["kind"] == "layer" and r.get("x_vs_peft_mixed") and r["provider"].startswith("ours"):
            both.setdefault(r["name"], r["x_vs_peft_mixed"])
    if both:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(both) + 1.5))
        names = list(both)
        ax.barh(names, [both[n] for n in names], color="tab:green")
        ax.axvline(1.0, color="k", lw=1)
        ax.set(xlabel="speed-up of ours over peft's mixed-adapter batch (higher is better)")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "ours_vs_peft.png", dpi=110)
        plt.close(fig)
        made.append("ours_vs_peft.png")
    return made


def write_results(rows, env, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}) + "\n")
    md = markdown(rows, env)
    (out / "results.md").write_text(md)
    plots(rows, out)
    return md


def regen(results: Path, target: Path = Path("BENCHMARKS.md")) -> None:
    """BENCHMARKS.md from a results folder: one command, no re-measuring."""
    lines = [json.loads(x) for x in open(results / "results.jsonl")]
    env = lines[0]["env"]
    rows = [{k: v for k, v in r.items() if k != "env"} for r in lines]
    rel = os.path.relpath(results, target.parent)
    images = "".join(f"![{p}]({rel}/{p})\n\n" for p in plots(rows, results))
    target.write_text("# Benchmarks\n\nRegenerate: `python -m benchmarks.run --out benchmarks/results` (measure), then "
                      "`python -m benchmarks.run --regen benchmarks/results` (this file).\n\n" + images +
                      markdown(rows, env))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/full")
    p.add_argument("--quick", action="store_true", help="the small subset (proper bench)")
    p.add_argument("--no-model", action="store_true", help="skip the SmolLM2 model-level cases")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--no-cold", action="store_true",
                   help="skip the beyond-the-caches cases (proper.bench.op_cold; never in --quick)")
    p.add_argument("--regen", metavar="RESULTS_DIR", help="rebuild BENCHMARKS.md from saved results and exit")
    p.add_argument("--target", default="BENCHMARKS.md", help="the file --regen writes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.regen:
        regen(Path(args.regen), Path(args.target))
        print(f"wrote {args.target}")
        return 0
    env = environment()
    rows = run_layer_cases(args.quick, with_peft=not args.no_peft)
    if not args.quick and not args.no_cold:
        rows += op_cold.run_cold_cases()
    if not args.no_model:
        rows += run_model_cases(args.quick)
    md = write_results(rows, env, Path(args.out))
    print(md)
    print(f"results: {Path(args.out) / 'results.jsonl'} (+ results.md, PNG plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
