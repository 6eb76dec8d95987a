"""The paged user store at scale: SmolLM2-135M, user-stage training steps, registered users U in {64, 1e4, 1e6}.

    python -m benchmarks.bench_user_store --out benchmarks/results

Set-up (issue 13): user LoRAs r8 on the FFN projections of all 30 layers, K = 4 experts r8 top-2, the LoRA-aware
router, 8 users x 64 tokens per step drawn uniformly from the U registered users, S = 16 resident slots,
proper.make_optimizer. Reported, all from one run:

- build: seconds and RSS that apply_proper adds (the base model's own load excluded), per U, and dense U = 64;
- step: median ms of a full training step (users() + forward + backward + optimizer step, page-ins and
  write-backs included), interleaved rounds over the models so load bursts hit all alike; ratio to U = 64;
- the paging floor: the bytes a step pages (8 users in, 8 dirty users out) over the measured memcpy rate;
- checkpoint: the saved folder's size after training one batch (8 users) for U = 1e6, vs the dense 64-user save;
- page-in cost per user (new user from its seed, stored user from memory, stored user from segment files) and
  write-back cost per user;
- generation: 16 users with S = 16 drawn from U = 1e6, 16 prompt + 16 new tokens, users paged in by the call
  vs already resident, beside the base model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import torch

import proper

from .timing import interleaved_times, rss_bytes, write_results

USERS = (64, 10_000, 1_000_000)
SLOTS = 16
BATCH, SEQ = 8, 64


def _rss_mb() -> float:
    return rss_bytes() / 2 ** 20


def _cfg(U: int, S) -> proper.ProperConfig:
    return proper.ProperConfig(num_users=U, num_experts=4, expert_rank=8, user_rank=8, top_k=2, alpha=16,
                               resident_users=S)


def build(U: int, S) -> Dict[str, Any]:
    model, tok = proper.load_smollm2()
    rss0, t0 = _rss_mb(), time.perf_counter()
    proper.apply_proper(model, _cfg(U, S))
    out = {"model": model, "tok": tok, "build_s": time.perf_counter() - t0, "build_mb": _rss_mb() - rss0}
    with torch.no_grad():   # non-zero shared parts (experts, routers), so no all-zero product is skipped
        g = torch.Generator().manual_seed(0)
        for layer in proper.proper_layers(model).values():
            for part in ("population", "experts"):
                for p in layer.part_parameters(part):
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    proper.set_stage(model, "user", init_experts=False)
    model.train()
    return out


def step_fn(model, U: int, seed: int):
    opt = proper.make_optimizer(model, lr=1e-4)
    rng = torch.Generator().manual_seed(seed)

    def step():
        ids = torch.randint(0, U, (BATCH,), generator=rng)
        x = torch.randint(10, 40000, (BATCH, SEQ), generator=rng)
        opt.zero_grad(set_to_none=True)
        with proper.users(model, ids):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
    return step


def memcpy_gbps() -> float:
    a = torch.empty(64 * 2 ** 20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    return 2 * a.numel() * 4 * 10 / (time.perf_counter() - t0) / 1e9   # read + write


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2 ** 20


@torch.no_grad()
def page_costs(model, U: int, tmp: Path) -> Dict[str, float]:
    """ms per user: page-in of new users (seeded init), write-back of dirty ones, page-in from memory and from
    segment files."""
    slots = proper.get_state(model).slots
    base = 500_000

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    new = [base + i for i in range(SLOTS)]
    t_new = timed(lambda: slots.rows(new, write=True)) / SLOTS            # 16 new users, all marked dirty
    nxt = [base + SLOTS + i for i in range(SLOTS)]
    t_out_in = timed(lambda: slots.rows(nxt)) / SLOTS                     # evicts (writes back) 16, pages 16 in
    t_mem = timed(lambda: slots.rows(new)) / SLOTS                        # the first 16 back from memory
    proper.save_pretrained(model, tmp / "pagecost")
    loaded, _ = proper.load_smollm2()
    proper.from_pretrained(loaded, tmp / "pagecost")
    ls = proper.get_state(loaded).slots
    t_file = timed(lambda: ls.rows(new)) / SLOTS                          # from the segment files (memmap)
    del loaded
    return {"page_in_new_ms": t_new, "write_back_plus_page_in_new_ms": t_out_in,
            "write_back_ms": t_out_in - t_new, "page_in_from_memory_ms": t_mem, "page_in_from_files_ms": t_file}


@torch.no_grad()
def generation(model, tok, U: int, rounds: int) -> Dict[str, float]:
    base_model, _ = proper.load_smollm2()
    g = torch.Generator().manual_seed(5)
    x = torch.randint(10, 40000, (16, 16), generator=g)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    model.eval()
    slots = proper.get_state(model).slots
    fresh = iter(range(U - 1, 0, -1))

    def cold():   # 16 users no slot holds yet: the call pages them in (evicting 16)
        ids = [next(fresh) for _ in range(16)]
        with proper.users(model, ids):
            model.generate(x, **kw)

    warm_ids = list(range(16))
    slots.rows(warm_ids)

    def warm():
        with proper.users(model, warm_ids):
            model.generate(x, **kw)

    def base():
        base_model.generate(x, **kw)

    times = interleaved_times({"base": base, "paged_in_by_call": cold, "resident": warm}, rounds, warmup=1)
    model.train()
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def run(rounds: int = 6, gen_rounds: int = 3) -> Dict[str, Any]:
    torch.manual_seed(0)
    res: Dict[str, Any] = {"setup": {"batch": BATCH, "seq": SEQ, "slots": SLOTS, "user_rank": 8, "experts": 4,
                                     "top_k": 2, "targets": "gate/up/down_proj x 30 layers",
                                     "threads": torch.get_num_threads()}}
    models: Dict[str, Dict[str, Any]] = {"dense U=64": build(64, None)}
    for U in USERS:
        models[f"paged U={U}"] = build(U, SLOTS)
    res["build"] = {k: {"seconds": round(v["build_s"], 3), "rss_mb": round(v["build_mb"], 1)}
                    for k, v in models.items()}
    steps = {k: step_fn(v["model"], int(k.split("=")[1]), i) for i, (k, v) in enumerate(models.items())}
    times = interleaved_times(steps, rounds, warmup=1, progress=True)
    res["step_ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ref = res["step_ms"]["paged U=64"]
    res["step_x_vs_paged_64"] = {k: v / ref for k, v in res["step_ms"].items()}
    # what a step pages at U = 1e6: 8 users in and 8 dirty users out, weights + Adam moments, fp32
    slots = proper.get_state(models["paged U=1000000"]["model"]).slots
    rec_bytes = slots.record(0).nbytes
    gbps = memcpy_gbps()
    res["paging_floor"] = {"record_mb": rec_bytes / 2 ** 20, "bytes_per_step_mb": 2 * BATCH * rec_bytes / 2 ** 20,
                           "memcpy_gb_s": gbps, "floor_ms_per_step": 2 * BATCH * rec_bytes / gbps / 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fresh = build(1_000_000, SLOTS)
        one = step_fn(fresh["model"], 1_000_000, 99)             # (kept alive: its moments are saved too)
        one()                                                    # one batch: 8 users trained
        proper.save_pretrained(fresh["model"], tmp / "u1e6")
        proper.save_pretrained(models["dense U=64"]["model"], tmp / "dense64")
        res["checkpoint_mb"] = {"paged U=1e6, 8 users trained": _dir_mb(tmp / "u1e6"),
                                "dense U=64": _dir_mb(tmp / "dense64")}
        res["page_cost"] = page_costs(fresh["model"], 1_000_000, tmp)
        del fresh, one
    m = models["paged U=1000000"]
    res["generate_ms"] = generation(m["model"], m["tok"], 1_000_000, gen_rounds)
    res["peak_rss_mb"] = _rss_mb()
    return res


def markdown(r: Dict[str, Any]) -> str:
    lines = [f"Setup: {r['setup']}", "", "| model | build s | build RSS MB | step ms | x vs paged U=64 |",
             "|---|---:|---:|---:|---:|"]
    for k in r["step_ms"]:
        b = r["build"][k]
        lines.append(f"| {k} | {b['seconds']:.2f} | {b['rss_mb']:.0f} | {r['step_ms'][k]:.0f} | "
                     f"{r['step_x_vs_paged_64'][k]:.3f} |")
    f = r["paging_floor"]
    lines += ["", f"Paging floor at U = 1e6: a record is {f['record_mb']:.1f} MB (weights + Adam moments), a step "
              f"moves {f['bytes_per_step_mb']:.0f} MB (8 in, 8 out) = {f['floor_ms_per_step']:.0f} ms at the "
              f"measured {f['memcpy_gb_s']:.1f} GB/s memcpy rate.", "",
              "| checkpoint | MB |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["checkpoint_mb"].items()]
    lines += ["", "| per user | ms |", "|---|---:|"]
    lines += [f"| {k.replace('_ms', '')} | {v:.2f} |" for k, v in r["page_cost"].items()]
    g = r["generate_ms"]
    lines += ["", "| generate 16 users x (16 + 16 tokens), S = 16, U = 1e6 | ms | x base |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.0f} | {v / g['base']:.2f} |" for k, v in g.items()]
    lines += ["", f"Peak RSS of the whole benchmark process: {r['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines) + "\n"


def plot(r: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(r["step_ms"])
    a.bar(names, [r["step_ms"][k] / 1e3 for k in names], color=["#888"] + ["#3a7"] * (len(names) - 1))
    a.set_ylabel("s per training step")
    a.set_title("user-stage step, 8 users x 64 tokens")
    a.tick_params(axis="x", rotation=20, labelsize=8)
    b.bar(names, [r["build"][k]["rss_mb"] for k in names], color=["#888"] + ["#37a"] * (len(names) - 1))
    b.set_ylabel("MB added by apply_proper")
    b.set_title("model build memory")
    b.tick_params(axis="x", rotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results")
    p.add_argument("--rounds", type=int, default=6, help="interleaved step rounds (median reported)")
    p.add_argument("--gen-rounds", type=int, default=3)
    args = p.parse_args(argv)
    r = run(args.rounds, args.gen_rounds)
    write_results(args.out, "bench_user_store", r, markdown(r))
    plot(r, Path(args.out) / "bench_user_store.png")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
