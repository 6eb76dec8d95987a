"""routed_lora beyond the caches, fp32 and bf16, against floors measured in the same run.

    python -m proper.bench.op_cold --out benchmarks/results/op_cold     # also part of the full suite

Cases (d_in = d_out = 2048, K = 8 experts of rank 16 with top-2 gates, user adapters of rank 16):

  decode-cold   1024 tokens of 1024 distinct users (the users' adapters: 268 MB in fp32)
  prefill-cold  2048 tokens of 16 users

Each provider cycles through enough copies of its problem to read more than ``cold_bytes`` (4x the 32 MB L3 of
our machines) before it meets the same weights again, so they come from memory as in a real model. Every round
times each provider once (interleaved) and then probes the machine: the read bandwidth (``.sum()`` of a 512 MiB
tensor) and the GEMM rate of the case's own dtype (``torch.mm``, 2048 x 2048 x 2048: oneDNN's bf16 kernels
for bf16). A row reports the medians over its rounds:

  % byte floor = (bytes the op must read and write / read bandwidth) / time
  % GEMM       = (FLOPs really needed / time) / the GEMM rate of the same dtype
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

from .layer_cases import LayerCase, make_inputs, work
from .timing import MALLOC_MODES, reuse_freed_memory

CASES = {
    "decode-cold": LayerCase("decode", 1024, "distinct", 16, False, 8, 2),
    "prefill-cold": LayerCase("prefill", 16, "uniform", 16, False, 8, 2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLD_BYTES = 128e6


def _inputs(case: LayerCase, seed: int, dtype: torch.dtype) -> Dict[str, object]:
    kw = make_inputs(case, seed=seed)
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}


def _call(backend: str, kw) -> torch.Tensor:
    """routed_lora on ``backend``; "cpu@ISA" runs the cpu backend with the micro-kernels of ISA (e.g. cpu@avx512:
    the widening bf16 kernels, beside the vdpbf16ps ones, in the same rounds)."""
    import proper_kernels as pk

    if "@" in backend:
        from proper_kernels import cpu

        backend, isa = backend.split("@", 1)
        before = cpu.isa()
        cpu.set_isa(isa)
        try:
            return _call(backend, kw)
        finally:
            cpu.set_isa(before)
    args = [kw[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
    rest = {k: kw[k] for k in ("user_ranks", "expert_scale", "user_scale", "user_weight")}
    # check_values=False as the model layer calls it (ids are validated once per batch, not once per layer)
    return pk.routed_lora(*args, backend=backend, check_values=False, **rest)


class _Probes:
    """The machine's rates, sampled between timed calls (one sample per call)."""

    def __init__(self):
        self.big = torch.ones(512 * 2 ** 20 // 4)
        self.mm = {n: (torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt))
                   for n, dt in DTYPES.items()}
        self.read_gbs()
        for n in DTYPES:
            self.gemm_gflops(n)

    def read_gbs(self) -> float:
        t0 = time.perf_counter()
        self.big.sum()
        return self.big.numel() * 4 / (time.perf_counter() - t0) / 1e9

    def gemm_gflops(self, dtype_name: str) -> float:
        a, b = self.mm[dtype_name]
        t0 = time.perf_counter()
        torch.mm(a, b)
        return 2.0 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9


def run_cold_cases(quick: bool = False, cases=tuple(CASES), dtypes=tuple(DTYPES), providers=("cpu", "torch"),
                   rounds: int = 0, cold_bytes: float = COLD_BYTES, progress: bool = True) -> List[Dict]:
    """One row per (case, dtype, provider): median ms over interleaved rounds and the floors of the same rounds."""
    import proper_kernels as pk
    from tqdm import tqdm

    providers = [p for p in providers if p.split("@")[0] in pk.available_backends("cpu")]
    rounds = rounds or (3 if quick else 7)
    probes = _Probes()
    rows = []
    for cname, dname in tqdm([(c, d) for c in cases for d in dtypes], desc="cold cases", disable=not progress):
        case, dtype = CASES[cname], DTYPES[dname]
        first = _inputs(case, 0, dtype)
        need = work(case, first, element_size=torch.finfo(dtype).bits // 8)
        copies = max(2, math.ceil(cold_bytes / need["bytes"]))
        problems = [first] + [_inputs(case, s, dtype) for s in range(1, copies)]
        times: Dict[str, List[float]] = {p: [] for p in providers}
        bws, gfs = [], []
        gc.collect()
        with torch.no_grad():
            for p in providers:                     # warm up: one pass over the copies
                for kw in problems:
                    _call(p, kw)
            for r in range(rounds * copies):        # each round: every provider once, on the next copy
                kw = problems[r % copies]
                for p in providers:
                    t0 = time.perf_counter()
                    _call(p, kw)
                    times[p].append(time.perf_counter() - t0)
                bws.append(probes.read_gbs())
                gfs.append(probes.gemm_gflops(dname))
        bw, gf = statistics.median(bws), statistics.median(gfs)
        for p in providers:
            ms = 1e3 * statistics.median(times[p])
            floor_ms = need["bytes"] / (bw * 1e9) * 1e3
            rows.append({"kind": "cold", "case": cname, "dtype": dname, "provider": p, "tokens": case.tokens,
                         "users": case.n_users, "ms": ms, "ms_min": 1e3 * min(times[p]), "bytes": need["bytes"],
                         "flops": need["flops"], "copies": copies, "read_gbs": bw, "gemm_gflops": gf,
                         "floor_ms": floor_ms, "pct_byte_floor": 100 * floor_ms / ms,
                         "pct_gemm_rate": 100 * need["flops"] / (ms / 1e3) / (gf * 1e9)})
        del problems
    return rows


def markdown(rows: List[Dict]) -> List[str]:
    """The rows as a markdown table (the suite's section and this module's own file)."""
    if not rows:
        return []
    out = ["Beyond the caches (d = 2048, K = 8 experts r16 top-2, user rank 16; each provider cycles through copies "
           "of the problem larger than the L3). Floors probed in the same rounds: read bandwidth and the GEMM rate of "
           "the row's own dtype. `% byte floor` = bytes / bandwidth / time; `% GEMM` = needed FLOPs / time / rate.",
           "", "| case | dtype | provider | ms | MB moved | read GB/s | GEMM GFLOP/s | % byte floor | % GEMM |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['case']} (T{r['tokens']}, U{r['users']}) | {r['dtype']} | {r['provider']} | {r['ms']:.2f} | "
                   f"{r['bytes'] / 1e6:.0f} | {r['read_gbs']:.1f} | {r['gemm_gflops']:.0f} | "
                   f"{r['pct_byte_floor']:.0f} | {r['pct_gemm_rate']:.0f} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_results/op_cold")
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated among {', '.join(CASES)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated among fp32, bf16")
    ap.add_argument("--providers", default="cpu,torch",
                    help="comma-separated: cpu, torch, cpu@ISA (the cpu backend with those micro-kernels)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--malloc", choices=MALLOC_MODES, default="default",
                    help="reuse: glibc keeps freed memory, so outputs do not page-fault in afresh in every call "
                         "(proper.bench.timing.reuse_freed_memory); default: glibc's own policy")
    args = ap.parse_args(argv)
    for name, vals, known in (("--cases", args.cases, CASES), ("--dtypes", args.dtypes, DTYPES)):
        bad = [v for v in vals.split(",") if v not in known]
        if bad:
            ap.error(f"{name}: unknown {bad}; expected some of {list(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "reuse" and not reuse_freed_memory():
        ap.error("--malloc reuse needs glibc's mallopt")
    from proper_kernels import cpu

    rows = run_cold_cases(args.quick, tuple(args.cases.split(",")), tuple(args.dtypes.split(",")),
                          tuple(args.providers.split(",")))
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_isa": cpu.isa(),
           "malloc": args.malloc, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alloc = "glibc keeping freed memory (--malloc reuse)" if args.malloc == "reuse" else "glibc's default malloc"
    md = "\n".join([f"{env['threads']} threads, cpu kernels {env['cpu_isa']}, torch {env['torch']}, {alloc}, "
                     f"{env['date']}.", ""] + markdown(rows)) + "\n"
    (out / "op_cold.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    (out / "op_cold.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
