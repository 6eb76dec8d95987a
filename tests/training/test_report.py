"""Reports from run folders: paired bootstrap of proper against each baseline, overall and per profile bucket,
and the multi-seed report; on small fake run folders written like run.py writes them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from proper.training import report as R
from proper.training.evaluation import rating_metrics

SYSTEMS = ("user_mean", "item_mean", "mf_svd", "population", "group", "population+user", "proper")


def fake_run(path, seed, offsets=None, users=12, per_user=3):
    """A run folder (metrics.json, predictions.json, run_config.json as run.py writes them): users 0..11 with
    profile sizes 10, 30, 300 in turn; each system predicts the target plus a seeded noise plus its offset."""
    rng = np.random.default_rng(seed)
    offsets = offsets or {}
    sizes = [(10, 30, 300)[u % 3] for u in range(users)]
    examples = [{"user": str(u), "target": str(int(rng.integers(1, 6))), "profile_size": sizes[u]}
                for u in range(users) for _ in range(per_user)]
    y = np.array([float(e["target"]) for e in examples])
    systems, metrics_sys = {}, {}
    for i, name in enumerate(SYSTEMS):
        pred = np.clip(y + rng.normal(0, 0.5, len(y)) + offsets.get(name, 0.0), 1, 5)
        systems[name] = {"pred": pred.tolist()}
        if name in ("population", "group", "proper"):
            systems[name]["expected"] = pred.tolist()
        metrics_sys[name] = rating_metrics(y, pred, [e["profile_size"] for e in examples])
    path.mkdir(parents=True)
    (path / "predictions.json").write_text(json.dumps({"examples": examples, "systems": systems}))
    (path / "metrics.json").write_text(json.dumps({
        "task": "rating", "systems": metrics_sys,
        "data": {"name": "fake", "users": users, "test": len(y), "test_scored": len(y), "dev_scored": users,
                 "profile_buckets": {"<=20": users // 3, "21-50": users // 3, ">200": users // 3}},
        "config": {"seed": seed}, "seconds_this_session": 1.0}))
    (path / "run_config.json").write_text(json.dumps({"train": {"seed": seed}, "users": [str(u) for u in
                                                                                          range(users)]}))
    return path


def test_paired_bootstrap_se_and_blocks_match_one_draw():
    rng = np.random.default_rng(1)
    a, b = rng.random(300), rng.random(300)
    r = R.paired_bootstrap(a, b, n_boot=5000, seed=7)
    d = a - b
    boots = d[np.random.default_rng(7).integers(0, 300, (5000, 300))].mean(1)   # the unblocked draw
    assert r["lo"] == np.percentile(boots, 2.5) and r["hi"] == np.percentile(boots, 97.5)
    assert r["se"] == boots.std(ddof=1) and r["diff"] == d.mean()
    with pytest.raises(ValueError, match="n_boot"):
        R.paired_bootstrap(a, b, n_boot=0)
    with pytest.raises(ValueError, match="err_a and err_b"):
        R.paired_bootstrap([], [])


def test_verdict_only_where_the_interval_excludes_zero():
    assert R.verdict({"lo": -0.2, "hi": -0.01}) == "better"
    assert R.verdict({"lo": 0.01, "hi": 0.3}) == "worse"
    assert R.verdict({"lo": -0.1, "hi": 0.0}) == "tie" and R.verdict({"lo": 0.0, "hi": 0.1}) == "tie"


def test_bucket_scopes_put_the_sparse_bucket_first():
    scopes = R.bucket_scopes([300, 30, 10, 75, 10])
    assert [s for s, _ in scopes] == ["all", "<=20", "21-50", "51-100", ">200"]
    assert dict((s, i.tolist()) for s, i in scopes)["<=20"] == [2, 4]


def test_proper_vs_baselines_every_baseline_every_scope(tmp_path):
    run = fake_run(tmp_path / "r", 0, offsets={"proper": -0.0, "user_mean": 1.5})
    rows = R.proper_vs_baselines(R.load_predictions(run))
    assert [(r["scope"], r["baseline"]) for r in rows[:7]] == (
        [("all", b) for b in R.BASELINES] + [("<=20", "user_mean")])
    assert {r["scope"] for r in rows} == {"all", "<=20", "21-50", ">200"}
    first = rows[0]
    assert first["ratings"] == 36 and first["users"] == 12 and first["baseline"] == "user_mean"
    assert first["hi"] < 0 and R.verdict(first) == "better"      # user_mean was pushed 1.5 off
    sparse = [r for r in rows if r["scope"] == "<=20"]
    assert sparse[0]["ratings"] == 12 and sparse[0]["users"] == 4
    with pytest.raises(KeyError, match="nobody"):
        R.proper_vs_baselines(R.load_predictions(run), system="nobody")


def test_write_report_has_the_paired_tables(tmp_path):
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "r", 0)
    text = R.write_report(run, tmp_path / "out.md").read_text()
    assert "| proper - mf_svd |" in text and "| proper - population+user |" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| profile ")]
    assert lines[0].startswith("| profile <=20: 12 (4) |")
    assert "MAE - user_mean MAE [95% CI]" in text          # the existing table is still there
