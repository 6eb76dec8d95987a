"""Wall-clock timing and peak-memory measurement shared by the demo, the CLI and the benchmarks."""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from typing import Callable, Dict, List

import torch


def _sync(device: str | None):
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, warmup: int = 2, min_reps: int = 5, min_seconds: float = 0.3,
            max_reps: int = 200, device: str | None = None) -> Dict[str, float]:
    """Median / min milliseconds of `fn()` over at least `min_reps` runs and `min_seconds` of timing."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}


def interleaved_times(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                      progress: bool = False, alternate: bool = False) -> Dict[str, List[float]]:
    """Wall seconds of each ``fns[name]()`` over ``reps`` rounds that call every fn once, after ``warmup`` calls
    each: a burst of load on a shared machine then hits every set-up alike, so their ratios stay meaningful.
    ``alternate``: odd rounds call the set-ups in reverse order, so no set-up always runs right after the same
    other one (what one leaves behind, freed memory or evicted caches, then falls on each side alike)."""
    names = list(fns)
    rounds = range(reps)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="timing rounds", leave=False)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for r in rounds:
        for name in (names[::-1] if alternate and r % 2 else names):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratios(times: Dict[str, List[float]], base: str, resamples: int = 2000,
                  seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Each set-up's time over ``base``'s, round by round (interleaved_times: both ran in the same round, so a
    burst of load on a shared machine mostly hits both): the median of the per-round ratios, and a 95% percentile
    bootstrap interval of that median (seeded; with few rounds it is as wide as the rounds disagree). On a machine
    whose speed drifts between rounds this is steadier than a ratio of the two medians, which pairs nothing.
    {name: {"median", "lo", "hi", "rounds"}}."""
    import numpy as np

    b = np.asarray(times[base], dtype=float)
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in times.items():
        r = np.asarray(t, dtype=float) / b
        meds = np.median(rng.choice(r, size=(resamples, len(r)), replace=True), axis=1)
        out[name] = {"median": float(np.median(r)), "lo": float(np.percentile(meds, 2.5)),
                     "hi": float(np.percentile(meds, 97.5)), "rounds": len(r)}
    return out


def _set_mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)
    except OSError:
        pass


MALLOC_MODES = ("default", "reuse")


def reuse_freed_memory() -> bool:
    """glibc malloc keeps freed memory for reuse, as a caching allocator does: no block gets a mapping of its own
    (``M_MMAP_MAX`` 0) and the heap is never trimmed (``M_TRIM_THRESHOLD`` at its largest). Process-wide and
    one-way, so only a benchmark's ``main`` calls it (``--malloc reuse``), never the library. Why: with glibc's
    defaults a large tensor (an op's 8 MB output, a training step's 200 MB of logits) is a fresh mapping whose
    pages fault in on first touch, unless a free hole of the heap happens to fit it, so the same call is fast in
    one process and slow in the next (measured: prefill-cold bf16 4.3 or 6.2 ms by process; the same
    cross-entropy 53 or 270 ms). Users get the same policy from the environment:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``. False where this is not
    glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2 ** 31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mb(fn: Callable[[], object], device: str | None = None) -> float:
    """Peak memory `fn()` adds above what was in use before, in MiB.

    CUDA: the caching allocator's peak counter. CPU: the process's resident set sampled every millisecond by a
    thread (torch's CPU allocator keeps no statistics; large tensors are mmap'd, so RSS follows them).
    """
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    gc.collect()
    _set_mmap_threshold(128 * 1024)    # large blocks mmap'd and returned on free, so RSS follows tensors
    base = peak = rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(1e-3)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
        _set_mmap_threshold(32 * 2**20)  # back to glibc's largest dynamic threshold: timing runs unaffected
    peak = max(peak, rss_bytes())
    return (peak - base) / 2**20


def write_results(out, name: str, result, markdown_text: str) -> None:
    """``out/<name>.json`` (the numbers) and ``out/<name>.md`` (the table people read), printed too."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown_text)
    print(markdown_text)


def plot_paired(paired: Dict[str, Dict[str, float]], path, title: str, goal: float | None = None) -> None:
    """A PNG of paired_ratios: one bar per set-up (its median ratio to base), the 95% interval as an error bar,
    base (1.0) and the goal as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(paired)[::-1]
    med = [paired[n]["median"] for n in names]
    err = [[paired[n]["median"] - paired[n]["lo"] for n in names],
           [paired[n]["hi"] - paired[n]["median"] for n in names]]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.4))
    ax.barh(names, med, xerr=err, color="#4C72B0", capsize=3)
    ax.axvline(1.0, color="black", lw=1)
    if goal is not None:
        ax.axvline(goal, color="#C44E52", ls="--", lw=1.2, label=f"goal {goal:g}x")
        ax.legend(loc="upper right", fontsize=8)
    right = max(paired[n]["hi"] for n in names)
    for y, n in enumerate(names):
        ax.text(paired[n]["hi"] + 0.01 * right, y, f" {paired[n]['median']:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.12 * right)
    ax.set_xlabel("time / base time, per interleaved round (median, 95% bootstrap interval)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
