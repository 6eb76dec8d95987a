"""benchmarks/gpu_check.sh and benchmarks/gpu_bench.py: the one-command GPU check, and the device grid it runs.

The device grid (test_device_grid) runs the Triton and CUDA backends on a real device against the fp64 oracle of
tests/cases.py; it is skipped where there is no CUDA device, unless PROPER_GRID_DEVICE names one (the dry run
sets "cpu" with TRITON_INTERPRET=1). PROPER_REQUIRE_BACKENDS=triton,cuda turns "backend unavailable" from a
skip into a failure (gpu_check.sh sets it on the GPU, where both must work); PROPER_GRID_DEADLINE (epoch
seconds) skips the grid's remaining cases once passed, so a slow grid still ends with its junit XML written.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import proper_kernels as pk
from benchmarks import gpu_bench as gb
from cases import POPULARITY, VARIANTS, check_backend, make_case

ROOT = Path(__file__).resolve().parents[2]
GRID_DEVICE = os.environ.get("PROPER_GRID_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
# gpu_check.sh gives the grid a deadline (epoch seconds): later cases skip, so pytest still writes its junit XML
DEADLINE = float(os.environ.get("PROPER_GRID_DEADLINE", "inf"))
REQUIRED = {b for b in os.environ.get("PROPER_REQUIRE_BACKENDS", "").split(",") if b}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- device grid
def _grid():
    """id -> make_case keywords: the interpreter grid's shapes (tests/triton_grid.py) plus the benchmark's own."""
    g = {}
    for dt in DTYPES:
        for pop in POPULARITY:
            g[f"pop-{pop}-{dt}"] = dict(T=37, popularity=pop, dtype=DTYPES[dt], seed=3)
        for T in (1, 133):
            for K in (0, 1, 8):     # odd widths, mixed ranks 1..64 with NaN padding, half the tokens without a user
                g[f"odd-T{T}-K{K}-{dt}"] = dict(T=T, d_in=67, d_out=33, K=K, U=9, r_max=64, r_e=16,
                                                 dtype=DTYPES[dt], popularity="half_none", seed=T + K)
            g[f"hidden2049-T{T}-{dt}"] = dict(T=T, d_in=2049, d_out=2049, K=2, r_e=4, U=3, r_max=8, dtype=DTYPES[dt])
    for dt in ("fp32", "bf16"):
        for name, kw in VARIANTS.items():
            g[f"variant-{name}-{dt}"] = dict(T=41, dtype=DTYPES[dt], **kw)
        for pop in ("distinct", "uniform"):   # the benchmark's layer: d = 2048, K = 8 r16 top-2, 64 users r16
            g[f"layer2048-{pop}-{dt}"] = dict(T=256, d_in=2048, d_out=2048, K=8, r_e=16, U=64, r_max=16,
                                               dtype=DTYPES[dt], popularity=pop, seed=4)
    g["many-users-distinct"] = dict(T=7, U=300, r_max=8, popularity="distinct")
    g["many-users-zipf"] = dict(T=7, U=300, r_max=8, popularity="zipf")
    g["long-segments-one-hot"] = dict(T=600, d_in=24, d_out=20, K=2, r_e=4, U=5, r_max=8, popularity="one_hot")
    g["prefill2048-bf16"] = dict(T=2048, d_in=2048, d_out=2048, K=8, r_e=16, U=16, r_max=16,
                                 dtype=torch.bfloat16, popularity="uniform", seed=5)
    return g


GRID = _grid()
# case-major order: if the deadline cuts the grid short, both backends have run the same first cases
GRID_PARAMS = [pytest.param(b, c, id=f"{b}-{c}") for c in GRID for b in ("triton", "cuda")] if GRID_DEVICE else \
    [pytest.param(None, None, id="no-device", marks=pytest.mark.skip(
        reason="no CUDA device (PROPER_GRID_DEVICE=cpu with TRITON_INTERPRET=1 runs it on the CPU)"))]


@pytest.mark.parametrize("backend, case_id", GRID_PARAMS)
def test_device_grid(backend, case_id, monkeypatch):
    """Forward and every gradient of `backend` on GRID_DEVICE vs the fp64 oracle (dtype-aware bounds)."""
    kw = GRID[case_id]
    if time.time() > DEADLINE:
        pytest.skip("the GPU check's time budget for the tests is spent (PROPER_GRID_DEADLINE)")
    try:
        pk.resolve_backend(backend, str(torch.device(GRID_DEVICE)), kw.get("dtype", torch.float32))
    except RuntimeError as e:
        if backend in REQUIRED:
            pytest.fail(f"backend {backend!r} is required (PROPER_REQUIRE_BACKENDS) but unavailable: {e}")
        pytest.skip(str(e))
    if backend == "triton":     # as tests/triton_grid.py: NaN scratch, so reading an unwritten column fails
        from proper_kernels.triton import launch

        monkeypatch.setattr(launch, "POISON_SCRATCH", True)
    check_backend(backend, make_case(**kw, device=GRID_DEVICE), f"{backend}/{case_id}@{GRID_DEVICE}")


# ------------------------------------------------------------------------------------ floors and ratios
def test_fractions_of_the_floors():
    # 1 GB in 1 ms is 1000 GB/s: half of a 2000 GB/s floor
    assert gb.fraction_of_bandwidth(1e9, 1.0, 2000.0) == pytest.approx(0.5)
    # 1 TFLOP in 10 ms is 100 TFLOP/s: a quarter of a 400 TFLOP/s floor
    assert gb.fraction_of_rate(1e12, 10.0, 400.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="ms and bandwidth_gbs"):
        gb.fraction_of_bandwidth(1e9, 0.0, 2000.0)
    with pytest.raises(ValueError, match="ms and tflops"):
        gb.fraction_of_rate(1e12, 1.0, float("nan"))


def test_floors_keep_the_best_probe():
    f = gb.combine_floors([{"bandwidth_gbs": 10.0, "matmul_tflops": 3.0}, {"bandwidth_gbs": 12.0,
                                                                           "matmul_tflops": 2.0}], torch.bfloat16)
    assert (f["bandwidth_gbs"], f["matmul_tflops"], f["dtype"], len(f["samples"])) == (12.0, 3.0, "bfloat16", 2)


def test_ratios_pair_rows_of_the_same_case():
    row = lambda p, ms, case="c": dict(case=case, provider=p, ms=ms, bytes=2e9, flops=4e12)  # noqa: E731
    rows = [row("ours-torch", 4.0), row("naive-loop", 8.0), row("ours-cuda", 2.0), row("peft-mixed", 3.0),
            row("ours-cuda", 1.0, case="other"), dict(case="c", provider="x", ms=None, bytes=1, flops=1)]
    gb.add_ratios(rows, {"bandwidth_gbs": 2000.0, "matmul_tflops": 1000.0})
    cuda = rows[2]
    assert cuda["frac_bw"] == pytest.approx(0.5) and cuda["frac_mm"] == pytest.approx(2.0)
    assert (cuda["vs_torch"], cuda["vs_naive"], cuda["vs_peft"]) == pytest.approx((2.0, 4.0, 1.5))
    assert rows[4]["vs_torch"] is None and "frac_bw" not in rows[5]     # no peers across cases; untimed rows


def test_gpu_case_prefill_length_and_accounting():
    c = gb.GpuCase("prefill", 4, "uniform", 16, False, 8, 2, d=64, prefill_tokens=64, training=True)
    assert (c.tokens, c.label) == (64, "train") and "-T64-" in c.name
    kw = gb.make_inputs(c)
    assert kw["x"].shape == (64, 64)
    assert gb.work(c, kw, element_size=2)["bytes"] * 2 == gb.work(c, kw)["bytes"]   # bf16: half of fp32's bytes


def test_clock_and_timer_on_cpu():
    calls = []
    t = gb.time_ms(lambda: calls.append(1), "cpu", warmup=2, reps=4, min_reps=3, cap_s=0.0,
                   flush=lambda: calls.append(0))
    assert t["reps"] == 3 and calls == [1, 1] + [0, 1] * 3 and t["ms_min"] <= t["ms"]
    assert gb.wall_ms_per_call(lambda: None, "cpu", 3) >= 0


def test_junit_summary_groups_the_grid_by_backend(tmp_path):
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_gpu_check" name="test_device_grid[triton-pop-zipf-fp32]"/>'
        '<testcase classname="tests.test_gpu_check" name="test_device_grid[cuda-pop-zipf-fp32]">'
        '<failure message="AssertionError: out: max abs error&#10;more"/></testcase>'
        '<testcase classname="tests.test_triton" name="test_layout"><skipped message="no triton"/></testcase>'
        '</testsuite></testsuites>')
    s = gb.junit_summary(tmp_path / "t.xml")
    assert (s["total"], s["passed"], s["failed"], s["skipped"]) == (3, 1, 1, 1)
    assert s["by_group"]["test_gpu_check::grid-cuda"]["failed"] == 1
    assert s["failures"][0]["message"] == "AssertionError: out: max abs error"
    assert s["skipped_reasons"] == {"no triton": 1}
    assert gb.junit_summary(tmp_path / "absent.xml") is None


# ----------------------------------------------------------------------------------------------- dry run
@pytest.mark.slow
def test_dry_run_script(tmp_path):
    """The whole script on CPU: every step runs its code path and ends "ok"; JSON and markdown come out."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PROPER_GRID_DEVICE")}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s["status"] for s in report["steps"]}
    assert steps == {n: "ok" for n in ("build", "env", "tests", "op", "generate", "report")}, steps
    assert report["schema"] == 1 and report["dry_run"] is True
    assert report["tests"]["failed"] == 0 and report["tests"]["by_group"]["test_gpu_check::grid-triton"]["passed"]
    op = report["op"]
    assert op["status"] == "ok" and {r["users"] for r in op["rows"]} == {2, 4}
    assert {r["phase"] for r in op["rows"]} == {"decode", "prefill", "train"}
    ok = [r for r in op["rows"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"ours-torch", "ours-triton", "naive-loop", "peft-mixed"}
    assert all(r["frac_bw"] > 0 and r["ms"] > 0 for r in ok)
    assert all(r["err_vs_torch"] < 1e-4 for r in ok if r.get("err_vs_torch") is not None)   # fp32 (DESIGN.md)
    assert not [r for r in op["rows"] if r["status"].startswith("error")]
    assert {r["setup"] for r in report["generate"]["rows"]} == {"base", "proper-auto", "peft-mixed"}
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Steps", "## Tests", "## Op benchmark (ok)", "## SmolLM2 generate (ok)"):
        assert heading in md
    assert ET.parse(out / "tests.xml").getroot() is not None
    assert (out / "log.txt").read_text().count("step ") >= 12          # a start and an end line per step
