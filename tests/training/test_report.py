"""Reports from run folders: paired bootstrap of proper against each baseline, overall and per profile bucket,
and the multi-seed report; on small fake run folders written like run.py writes them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from proper.training import report as R
from proper.training.evaluation import rating_metrics

SYSTEMS = ("user_mean", "user_median", "item_mean", "mf_svd", "population", "group", "population+user", "proper")


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
    assert [(r["scope"], r["baseline"]) for r in rows[:len(R.BASELINES) + 1]] == (
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


# ------------------------------------------------------------------------------------------ several seeds
def _three_seeds(tmp_path, **kw):
    return [fake_run(tmp_path / f"run{s}", s, **kw) for s in (0, 1, 2)]


def _section(text, title):
    part = text.split(f"### {title}")[1]
    return part.split("\n### ")[0]


def test_multi_seed_report_sections(tmp_path):
    from proper.training.results import multi_seed_report

    runs = _three_seeds(tmp_path, offsets={"user_mean": 1.5})
    text = multi_seed_report(runs)
    summary = _section(text, "Systems per seed")
    assert "| system | MAE s0 | MAE s1 | MAE s2 | mean MAE | RMSE s0 / s1 / s2 |" in summary
    m = [json.loads((r / "metrics.json").read_text())["systems"]["proper"] for r in runs]
    mean = sum(x["mae"] for x in m) / 3
    assert f"| proper | {m[0]['mae']:.3f} | {m[1]['mae']:.3f} | {m[2]['mae']:.3f} | " in summary
    assert f"{mean:.3f}" in summary
    overall = _section(text, "proper against each baseline, all test ratings")
    rows = [ln for ln in overall.splitlines() if ln.startswith("| proper - user_mean |")]
    assert [ln.split("|")[2].strip() for ln in rows] == ["s0", "s1", "s2", "pooled"]
    assert all(ln.endswith("| better |") for ln in rows)   # user_mean pushed 1.5 off
    r1 = R.proper_vs_baselines(R.load_predictions(runs[1]))[0]
    assert rows[1] == (f"| proper - user_mean | s1 | {r1['diff']:+.3f} | {r1['se']:.3f} | "
                       f"[{r1['lo']:+.3f}, {r1['hi']:+.3f}] | better |")
    buckets = _section(text, "proper against each baseline, by training-profile size (sparse users first)")
    heads = [ln for ln in buckets.splitlines() if ln.startswith("Profile ")]
    assert [h.split(" ")[1] for h in heads] == ["<=20", "21-50", ">200"]
    assert heads[0].startswith("Profile <=20 (sparse users) - s0: 12 ratings (4 users)")
    counts = _section(text, "Test ratings and users per seed")
    assert "| s0 | 36 (12) | 12 (4) | 12 (4) | 12 (4) |" in counts


def test_pooled_contrasts_are_the_seeds_ratings_as_one_sample(tmp_path):
    from proper.training.results import load_runs, multi_seed_report, pooled_run

    runs = _three_seeds(tmp_path, offsets={"user_mean": 0.3})
    pooled = pooled_run(load_runs(runs))
    preds = [R.load_predictions(r) for r in runs]
    y = np.concatenate([[float(e["target"]) for e in p["examples"]] for p in preds])
    err = {n: np.abs(np.concatenate([p["systems"][n]["pred"] for p in preds]) - y) for n in ("proper", "user_mean")}
    row = next(c for c in pooled["contrasts"] if c["scope"] == "all" and c["baseline"] == "user_mean")
    assert row["diff"] == pytest.approx(float((err["proper"] - err["user_mean"]).mean()), abs=1e-12)
    assert (row["ratings"], row["users"]) == (108, 36)     # the same user ids in three seeds are three users
    single = [c["se"] for r in load_runs(runs) for c in r["contrasts"] if c["scope"] == "all"
              and c["baseline"] == "user_mean"]
    assert row["se"] < min(single)                          # three times the ratings: a narrower interval
    buckets = _section(multi_seed_report(runs), "proper against each baseline, by training-profile size (sparse "
                                                "users first)")
    sparse = next(ln for ln in buckets.splitlines() if ln.startswith("Profile "))
    assert sparse.endswith("; pooled: 36 ratings (12 users)")
    (runs[0] / "predictions.json").unlink()
    assert pooled_run(load_runs(runs))["contrasts"][0]["ratings"] == 72     # the seeds that have predictions
    (runs[1] / "predictions.json").unlink()
    assert pooled_run(load_runs(runs)) is None
    assert "| pooled |" not in multi_seed_report(runs)


def test_multi_seed_report_without_predictions_and_verdict_words(tmp_path):
    from proper.training.results import multi_seed_report

    runs = _three_seeds(tmp_path)
    (runs[0] / "predictions.json").unlink()
    text = multi_seed_report(runs)
    assert "No paired intervals for s0" in text
    assert "| proper - user_mean | s0 | - | - | - | no predictions.json |" in text
    overall = _section(text, "proper against each baseline, all test ratings")
    words = {ln.rsplit("|", 2)[1].strip() for ln in overall.splitlines() if ln.startswith("| proper - ")
             and "| s1 |" in ln}
    assert len(words) >= 1
    assert words <= {"better", "worse", "tie"}
    assert "| s0 | 36 (12) |" in _section(text, "Test ratings and users per seed")   # from metrics.json


def test_multi_seed_report_labels_and_errors(tmp_path):
    from proper.training.results import load_runs, multi_seed_report

    a = fake_run(tmp_path / "a", 5)
    b = fake_run(tmp_path / "b", 5)
    assert [r["label"] for r in load_runs([a, b])] == ["a", "b"]      # same seed twice: folder names
    with pytest.raises(ValueError, match="run_dirs"):
        multi_seed_report([])
    with pytest.raises(ValueError, match="run_dirs"):
        multi_seed_report(str(a))
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        multi_seed_report([a, tmp_path / "nothing"])


def test_cli_eval_several_runs_writes_the_multi_seed_report(tmp_path, capsys):
    from proper.cli.app import main

    runs = _three_seeds(tmp_path)
    out = tmp_path / "docs" / "RESULTS_tables.md"
    assert main(["eval", *map(str, runs), "--report", str(out)]) == 0
    assert "### Systems per seed" in out.read_text()
    assert f"report: {out}" in capsys.readouterr().out
    assert main(["eval", *map(str, runs)]) == 0                    # no --report: printed
    assert "### Test ratings and users per seed" in capsys.readouterr().out
    assert main(["eval", str(runs[0]), str(tmp_path / "missing")]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err


def test_cli_eval_one_run_report_has_paired_tables(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from proper.cli.app import main

    run = fake_run(tmp_path / "r", 0)
    assert main(["eval", str(run), "--report", str(tmp_path / "r.md")]) == 0
    assert "| proper - mf_svd |" in (tmp_path / "r.md").read_text()
    # --decision median is not ignored for one run: that run's report under the median rule
    assert main(["eval", str(run), "--decision", "median", "--report", str(tmp_path / "m.md")]) == 0
    assert "the median of the five-rating distribution" in (tmp_path / "m.md").read_text()


def test_median_rating_is_the_smallest_rating_reaching_half_the_mass():
    from proper.training.evaluation import median_rating

    probs = np.array([[0.1, 0.1, 0.2, 0.4, 0.2],     # cdf 0.1 0.2 0.4 0.8: 4 (the argmax too)
                      [0.3, 0.0, 0.0, 0.0, 0.7],     # bimodal: the argmax says 5, the median 5
                      [0.45, 0.0, 0.1, 0.0, 0.45],   # cdf 0.45 0.45 0.55: 3 (the argmax says 1)
                      [0.5, 0.0, 0.0, 0.0, 0.5],     # exactly half at 1: 1
                      [0.2, 0.2, 0.2, 0.2, 0.2]])    # uniform: 3
    assert median_rating(probs).tolist() == [4, 5, 3, 1, 3]
    assert median_rating(probs * 3.0).tolist() == [4, 5, 3, 1, 3]   # unnormalised rows


def test_rating_metrics_report_the_median_rule():
    y, pred, med = np.array([1.0, 5.0]), np.array([3.0, 3.0]), np.array([1.0, 4.0])
    r = rating_metrics(y, pred, [10, 300], y_expected=pred, y_median=med)
    assert r["mae"] == 2.0 and r["mae_median"] == 0.5 and r["rmse_median"] == pytest.approx(np.sqrt(0.5))
    assert r["buckets"][">200"]["mae_median"] == 1.0


def test_multi_seed_report_under_the_median_rule(tmp_path):
    """--decision median: the LLM systems are scored by their "median" predictions, the classic rows (point
    predictors) by their own; runs without median predictions get no intervals, named as such."""
    from proper.training.results import multi_seed_report

    runs = _three_seeds(tmp_path, offsets={"user_mean": 1.5})
    for i, run in enumerate(runs):
        p = json.loads((run / "predictions.json").read_text())
        m = json.loads((run / "metrics.json").read_text())
        y = [float(e["target"]) for e in p["examples"]]
        sizes = [e["profile_size"] for e in p["examples"]]
        for name in ("population", "group", "proper"):
            p["systems"][name]["median"] = y if name == "proper" else p["systems"][name]["pred"]   # proper exact
            m["systems"][name] = rating_metrics(y, p["systems"][name]["pred"], sizes, p["systems"][name]["pred"],
                                                p["systems"][name]["median"])
        (run / "predictions.json").write_text(json.dumps(p))
        (run / "metrics.json").write_text(json.dumps(m))
    text = multi_seed_report(runs, decision="median")
    assert "the median of the five-rating distribution" in text
    summary = _section(text, "Systems per seed")
    assert "| proper | 0.000 | 0.000 | 0.000 | **0.000** |" in summary
    um = json.loads((runs[0] / "metrics.json").read_text())["systems"]["user_mean"]["mae"]
    assert f"| user_mean | {um:.3f} |" in summary                    # point predictors keep their own rating
    overall = _section(text, "proper against each baseline, all test ratings")
    rows = [ln for ln in overall.splitlines() if ln.startswith("| proper - ") and "baseline" not in ln]
    assert len(rows) == 4 * len(R.BASELINES) and all(ln.endswith("| better |") for ln in rows)   # 3 seeds, pooled
    argmax = multi_seed_report(runs)
    assert "the argmax of the five-rating distribution" in argmax and argmax != text
    (runs[2] / "predictions.json").write_text(json.dumps(
        {**json.loads((runs[2] / "predictions.json").read_text()),
         "systems": {k: {kk: vv for kk, vv in v.items() if kk != "median"}
                     for k, v in json.loads((runs[2] / "predictions.json").read_text())["systems"].items()}}))
    assert "No paired intervals for s2: no per-example predictions.json with `proper`'s median ratings" in \
        multi_seed_report(runs, decision="median")
    with pytest.raises(ValueError, match="decision must be one of"):
        multi_seed_report(runs, decision="mean")
