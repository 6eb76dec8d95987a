"""The command line and the benchmark runner produce what they promise (smoke runs on small sizes)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_op_demo_agrees_with_reference():
    from proper.bench.op_check import format_op_rows, run_op_demo

    rows = run_op_demo(T_decode=8, T_prefill=64, d=128)
    assert {r["backend"] for r in rows} >= {"torch"}
    for r in rows:
        assert r["max_rel_err"] < 1e-4, r        # fp32 backends vs the fp64 reference, fwd + all grads
        assert r["ms"] > 0 and r["loop_ms"] > 0
    assert "speed-up" in format_op_rows(rows)


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "proper", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for cmd in ("demo", "train", "eval", "generate", "bench"):
        assert cmd in out.stdout


def test_bench_runner_writes_jsonl_markdown_plots(tmp_path, monkeypatch):
    from proper.bench import layer_cases, suite as run

    small = [layer_cases.LayerCase("decode", n, "distinct", 8, False, 4, 2, d=128) for n in (1, 8)] + \
        [layer_cases.LayerCase("decode", 8, "distinct", 8, False, 0, 0, d=128),
         layer_cases.LayerCase("decode", 8, "distinct", 8, False, 4, 2, d=128, training=True)]
    monkeypatch.setattr(run, "grid", lambda quick: small)
    monkeypatch.setattr(run, "read_bandwidth_gbs", lambda: 10.0)
    monkeypatch.setattr(run, "gemm_gflops", lambda: 50.0)
    assert run.main(["--quick", "--no-model", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    providers = {r["provider"] for r in rows}
    assert {"ours-torch", "naive-loop"} <= providers
    assert "peft-mixed" in providers          # the K = 0 case runs peft's mixed-adapter batch
    for r in rows:
        assert r["ms"] > 0 and r["env"]["versions"]["torch"]
        assert r["x_vs_naive"] is not None
    assert "| case | provider |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "speed_vs_users.png").stat().st_size > 1000
    assert (tmp_path / "ours_vs_peft.png").stat().st_size > 1000
    target = tmp_path / "BENCHMARKS.md"
    run.regen(tmp_path, target)
    assert "speed_vs_users.png" in target.read_text()


def test_interleaved_times_alternates_the_setups():
    from proper.bench.timing import interleaved_times

    calls = []
    t = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in t.items()} == {"a": 3, "b": 3} and all(x >= 0 for v in t.values() for x in v)
    calls.clear()
    interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=0,
                      alternate=True)
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_paired_ratios_pair_each_round_with_the_base():
    from proper.bench.timing import paired_ratios

    # the machine doubles its speed between rounds; "x" is always 1.5x base in its own round
    times = {"base": [2.0, 1.0, 2.0, 1.0, 2.0], "x": [3.0, 1.5, 3.0, 1.5, 3.0], "y": [2.0, 2.0, 2.0, 2.0, 2.0]}
    r = paired_ratios(times, "base")
    assert r["base"] == {"median": 1.0, "lo": 1.0, "hi": 1.0, "rounds": 5}
    assert r["x"]["median"] == r["x"]["lo"] == r["x"]["hi"] == 1.5      # a ratio of medians would say 1.5 too,
    assert r["y"]["median"] == 1.0 and r["y"]["lo"] == 1.0 and r["y"]["hi"] == 2.0   # but not this spread
    assert paired_ratios(times, "base") == r                            # seeded


def test_generate_verdicts_pair_peft_with_proper_round_by_round():
    from proper.bench.generate import GOAL_VS_BASE, GOAL_VS_PEFT, goal_verdicts

    # the machine's speed swings 3x between rounds; proper is 1.3x base in every round, peft 2.4x proper in three
    # rounds and 1.8x in two: the paired median says 2.4 (goal met), a ratio of medians 7.02 / 3.9 = 1.8 (missed)
    times = {"base": [1.0, 3.0, 1.0, 3.0, 3.0], "proper[cpu]": [1.3, 3.9, 1.3, 3.9, 3.9],
             "peft": [3.12, 7.02, 3.12, 7.02, 9.36]}
    v = goal_verdicts(times, ["proper[cpu]"])["proper[cpu]"]
    assert v["vs_base"] == 1.3 <= GOAL_VS_BASE
    assert v["peft_over_proper"] == 2.4 >= GOAL_VS_PEFT and v["peft_over_proper_ci"] == [1.8, 2.4]
    assert v["goal_met"] is True
    assert "peft_over_proper" not in goal_verdicts({k: times[k] for k in ("base", "proper[cpu]")},
                                                   ["proper[cpu]"])["proper[cpu]"]


def test_plot_paired_writes_a_png(tmp_path):
    from proper.bench.timing import paired_ratios, plot_paired

    plot_paired(paired_ratios({"base": [1.0, 2.0], "x": [1.3, 2.4]}, "base"), tmp_path / "p.png", "t", goal=1.25)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cold_cases_rows_and_table(monkeypatch, tmp_path):
    """The beyond-the-caches cases: one row per case x dtype x provider, floors from the same rounds, each copy of
    the problem used in turn; the suite's table shows them; bad --dtypes / --cases are named."""
    import pytest

    from proper.bench import layer_cases, op_cold

    class Probes:   # fixed rates: the arithmetic of the floors is checked, not this machine
        def read_gbs(self):
            return 10.0

        def gemm_gflops(self, dtype_name):
            return {"fp32": 50.0, "bf16": 200.0}[dtype_name]

    monkeypatch.setattr(op_cold, "_Probes", Probes)
    monkeypatch.setattr(op_cold, "CASES", {"decode-cold": layer_cases.LayerCase("decode", 8, "distinct", 8, False, 4, 2,
                                                                                 d=64)})
    seen = []
    real = op_cold._call
    monkeypatch.setattr(op_cold, "_call", lambda b, kw: seen.append(id(kw["x"])) or real(b, kw))
    rows = op_cold.run_cold_cases(cases=("decode-cold",), providers=("torch",), rounds=2, cold_bytes=1e5,
                                  progress=False)
    assert [(r["dtype"], r["provider"]) for r in rows] == [("fp32", "torch"), ("bf16", "torch")]
    fp32, bf16 = rows
    assert fp32["copies"] >= 2 and len(set(seen)) == fp32["copies"] + bf16["copies"]
    assert bf16["bytes"] * 2 == fp32["bytes"] and bf16["gemm_gflops"] == 200.0
    for r in rows:
        assert abs(r["floor_ms"] - r["bytes"] / 10e9 * 1e3) < 1e-12
        assert abs(r["pct_byte_floor"] - 100 * r["floor_ms"] / r["ms"]) < 1e-9
    from proper.bench import suite

    md = suite.markdown(rows, {"machine": "m", "versions": {"torch": "t"}, "commit": None, "date": "d"})
    assert "Beyond the caches" in md and "| decode-cold (T8, U8) | bf16 | torch |" in md
    with pytest.raises(SystemExit):
        op_cold.main(["--dtypes", "fp16", "--out", str(tmp_path)])


def test_decode_step_bench_writes_its_rows(tmp_path):
    import pytest
    import proper_kernels as pk
    if "cpu" not in pk.available_backends("cpu"):
        pytest.skip("the cpu extension is not built")
    from proper.bench import decode_step

    assert decode_step.main(["--quick", "--dtypes", "fp32,bf16", "--out", str(tmp_path), "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "decode_step.json").read_text())["rows"]
    assert {(r["dtype"], r["provider"]) for r in rows} == {
        (d, p) for d in ("fp32", "bf16") for p in ("bound", "pack-per-call", "stream")}
    assert all(r["ms"] > 0 and r["adapter_mb"] > 0 for r in rows)
    assert "| fp32 | bound |" in (tmp_path / "decode_step.md").read_text()
    with pytest.raises(SystemExit):
        decode_step.main(["--dtypes", "fp16"])


def test_reuse_freed_memory_keeps_freed_blocks():
    """--malloc reuse: after reuse_freed_memory() a freed 64 MB tensor stays in the process (no page faults when the
    next one comes); under glibc's defaults the same block is unmapped on free. Subprocesses: the switch is one-way."""
    import subprocess
    import sys

    code = ("import sys, torch; from proper.bench.timing import reuse_freed_memory, rss_bytes\n"
            "if sys.argv[1] == 'reuse': assert reuse_freed_memory()\n"
            "a = torch.ones(64 << 20, dtype=torch.uint8); before = rss_bytes(); del a\n"
            "print((before - rss_bytes()) / 2 ** 20)\n")
    dropped = {}
    for mode in ("default", "reuse"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        dropped[mode] = float(r.stdout.split()[-1])
    assert dropped["default"] > 60 and dropped["reuse"] < 4, dropped
