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
