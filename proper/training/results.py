"""RESULTS tables over several seeds: one run folder per seed, everything read from the committed files.

    proper eval results/a results/b results/c --report RESULTS_tables.md

(a) MAE/RMSE of every system per seed, (b) PROPER minus each baseline per seed (paired bootstrap on the same
test ratings: mean difference of |error|, SE, 95% interval, verdict), (c) the same per profile-size bucket,
sparse users (<= 20 training ratings) first, (d) how many test ratings and users each seed scored. (b) and (c)
also have a ``pooled`` column: every seed's test ratings as one sample (:func:`pooled_run`). A seed's
sparse bucket (about 50 ratings) cannot separate systems a few hundredths apart; the per-seed columns show that
rather than average it away, and the pooled one narrows it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .report import (BASELINES, DECISIONS, SCOPE_ORDER, SPARSE_BUCKET, _order, bucket_scopes, decided, fmt_ci,
                     load_metrics, load_predictions, proper_vs_baselines, verdict)


def _decision_key(decision: str) -> str:
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {sorted(DECISIONS)}, got {decision!r}")
    return DECISIONS[decision]


def load_runs(run_dirs: Sequence, system: str = "proper", n_boot: int = 5000, seed: int = 0,
              decision: str = "argmax") -> List[Dict[str, Any]]:
    """Each run folder's metrics, predictions (None without predictions.json), label (``s<seed>``, the folder
    name where seeds repeat or are missing) and its paired contrasts (None without predictions, or without
    ``decision``'s predictions of ``system``)."""
    if isinstance(run_dirs, (str, Path)) or not len(run_dirs):
        raise ValueError(f"run_dirs must be a non-empty list of run folders, got {run_dirs!r}")
    key = _decision_key(decision)
    runs = []
    for d in run_dirs:
        m = load_metrics(d)
        p = load_predictions(d)
        has = p is not None and p["systems"].get(system) is not None and decided(p["systems"][system], key) is not None
        runs.append({"dir": Path(d), "metrics": m, "preds": p, "decision": decision,
                     "contrasts": proper_vs_baselines(p, system, key=key, n_boot=n_boot, seed=seed) if has else None})
    seeds = [r["metrics"].get("config", {}).get("seed") for r in runs]
    unique = None not in seeds and len(set(seeds)) == len(seeds)
    for r, s in zip(runs, seeds):
        r["label"] = f"s{s}" if unique else r["dir"].name
    return runs


def pooled_run(runs: List[Dict[str, Any]], system: str = "proper", n_boot: int = 5000,
               seed: int = 0) -> Optional[Dict[str, Any]]:
    """The seeds' test ratings as one sample (label ``pooled``): their predictions concatenated (users kept
    apart by seed), and its paired contrasts. One seed's interval is wide where a bucket holds few ratings (the
    sparse users: about 50 per seed); pooling the seeds narrows it. The resample treats the seeds' ratings as
    independent, although a user drawn in two seeds appears twice (128 of 943 users per seed: about 17 shared
    by two seeds), so the pooled interval is slightly optimistic. None with fewer than two runs with contrasts,
    or when the runs do not share ``system``'s decided predictions."""
    with_preds = [r for r in runs if r["contrasts"] is not None]
    if len(with_preds) < 2:
        return None
    names = set.intersection(*({n for n, v in r["preds"]["systems"].items() if v is not None} for r in with_preds))
    systems = {}
    for n in names:
        keys = set.intersection(*(set(r["preds"]["systems"][n]) for r in with_preds))
        systems[n] = {k: [v for r in with_preds for v in r["preds"]["systems"][n][k]] for k in keys}
    examples = [{**e, "user": f"{r['label']}/{e['user']}"} for r in with_preds for e in r["preds"]["examples"]]
    preds = {"examples": examples, "systems": systems}
    key = _decision_key(with_preds[0]["decision"])
    if system not in systems or decided(systems[system], key) is None:
        return None
    return {"dir": None, "label": "pooled", "metrics": None, "preds": preds, "decision": with_preds[0]["decision"],
            "contrasts": proper_vs_baselines(preds, system, key=key, n_boot=n_boot, seed=seed)}


def _mean(xs: List[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _decided_metrics(s: Optional[Dict[str, Any]], decision: str) -> Optional[Dict[str, float]]:
    """{"mae", "rmse"} of a system's metrics under ``decision`` (a point predictor: its own; an LLM system's
    median: mae_median / rmse_median), None where the run has none."""
    if s is None or decision == "argmax" or "mae_expected" not in s:
        return s
    return {"mae": s["mae_median"], "rmse": s["rmse_median"]} if "mae_median" in s else None


def seed_summary_table(runs: List[Dict[str, Any]]) -> str:
    """(a) One row per system: MAE per seed, mean MAE over the seeds that have it (lowest in bold), RMSE per
    seed (the LLM systems under the runs' decision rule)."""
    names = _order({n: None for r in runs for n in r["metrics"]["systems"]})
    labels = [r["label"] for r in runs]
    per_run = {n: [_decided_metrics(r["metrics"]["systems"].get(n), r.get("decision", "argmax")) for r in runs]
               for n in names}
    means = {n: _mean([s["mae"] for s in per if s]) for n, per in per_run.items()}
    best = min(v for v in means.values() if v is not None)
    lines = ["| system | " + " | ".join(f"MAE {lab}" for lab in labels) + " | mean MAE | RMSE " + " / ".join(labels)
             + " |", "|---|" + "---:|" * (len(labels) + 2)]
    for n in names:
        per = per_run[n]
        if means[n] is None:
            continue
        mae = " | ".join(f"{s['mae']:.3f}" if s else "-" for s in per)
        rmse = " / ".join(f"{s['rmse']:.3f}" if s else "-" for s in per)
        mean = f"{means[n]:.3f}" + ("" if all(per) else f" ({sum(map(bool, per))} seeds)")
        lines.append(f"| {n} | {mae} | {'**' + mean + '**' if means[n] == best else mean} | {rmse} |")
    return "\n".join(lines)


def _cell(row: Dict[str, Any]) -> str:
    return f"{row['diff']:+.3f} ± {row['se']:.3f} {fmt_ci(row)} {verdict(row)}"


def _rows(run: Dict[str, Any], scope: str) -> Dict[str, Dict[str, Any]]:
    return {r["baseline"]: r for r in run["contrasts"] or [] if r["scope"] == scope}


def _baselines(runs: List[Dict[str, Any]]) -> List[str]:
    present = {r["baseline"] for run in runs for r in run["contrasts"] or []}
    return [b for b in BASELINES if b in present]


def overall_contrast_table(runs: List[Dict[str, Any]], system: str = "proper") -> str:
    """(b) Per seed, ``system`` minus each baseline on all test ratings: MAE diff, SE, 95% CI, verdict."""
    lines = [f"| {system} - baseline | seed | MAE diff | SE | 95% CI | verdict |", "|---|---|---:|---:|---:|---|"]
    for b in _baselines(runs):
        for run in runs:
            r = _rows(run, "all").get(b)
            if r is None:
                why = "no predictions.json" if run["preds"] is None else "not in this run"
                lines.append(f"| {system} - {b} | {run['label']} | - | - | - | {why} |")
            else:
                lines.append(f"| {system} - {b} | {run['label']} | {r['diff']:+.3f} | {r['se']:.3f} | {fmt_ci(r)} | "
                             f"{verdict(r)} |")
    return "\n".join(lines)


def _scopes(runs: List[Dict[str, Any]]) -> List[str]:
    """Bucket labels present in any run, in :func:`bucket_scopes` order (sparse first), without ``"all"``."""
    seen = {r["scope"] for run in runs for r in run["contrasts"] or []}
    return [s for s in SCOPE_ORDER[1:] if s in seen]


def bucket_contrast_tables(runs: List[Dict[str, Any]], system: str = "proper") -> str:
    """(c) One table per profile bucket (sparse first): baselines x seeds, each cell ``diff ± SE [CI] verdict``,
    with the bucket's test ratings (users) per seed in the header."""
    labels = [r["label"] for r in runs]
    out = []
    for scope in _scopes(runs):
        sizes = []
        for run in runs:
            any_row = next(iter(_rows(run, scope).values()), None)
            sizes.append(f"{run['label']}: {any_row['ratings']} ratings ({any_row['users']} users)" if any_row
                         else f"{run['label']}: -")
        head = f"Profile {scope}" + (" (sparse users)" if scope == SPARSE_BUCKET else "") + " - " + "; ".join(sizes)
        lines = [head, "", f"| {system} - baseline | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for b in _baselines(runs):
            cells = [_rows(run, scope).get(b) for run in runs]
            lines.append(f"| {system} - {b} | " + " | ".join(_cell(c) if c else "-" for c in cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _counts(run: Dict[str, Any]) -> Dict[str, tuple]:
    """{scope: (test ratings, users)}: from predictions.json when there is one, else from metrics.json."""
    p = run["preds"]
    if p is not None:
        users = [str(e["user"]) for e in p["examples"]]
        return {s: (int(idx.size), len({users[i] for i in idx}))
                for s, idx in bucket_scopes([e["profile_size"] for e in p["examples"]])}
    m = run["metrics"]
    d = m.get("data", {})
    first = next(iter(m["systems"].values()))
    out = {"all": (d.get("test_scored", first.get("n")), d.get("users"))}
    for b, r in first.get("buckets", {}).items():
        out[b] = (r["n"], d.get("profile_buckets", {}).get(b))
    return out


def counts_table(runs: List[Dict[str, Any]]) -> str:
    """(d) Test ratings and users per seed, overall and per bucket (sparse first)."""
    counts = [_counts(r) for r in runs]
    scopes = [s for s in SCOPE_ORDER if any(s in c for c in counts)]
    lines = ["| seed | " + " | ".join("test ratings (users)" if s == "all" else f"profile {s}" for s in scopes) + " |",
             "|---|" + "---:|" * len(scopes)]
    for run, c in zip(runs, counts):
        cells = [f"{c[s][0]} ({'?' if c[s][1] is None else c[s][1]})" if s in c else "-" for s in scopes]
        lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multi_seed_report(run_dirs: Sequence, system: str = "proper", n_boot: int = 5000, seed: int = 0,
                      decision: str = "argmax") -> str:
    """The markdown of (a) .. (d) for the run folders ``run_dirs`` (one per seed, in the given order), the LLM
    systems' rating taken by ``decision`` (:data:`report.DECISIONS`)."""
    runs = load_runs(run_dirs, system, n_boot, seed, decision)
    pooled = pooled_run(runs, system, n_boot, seed)
    contrast_runs = runs + ([pooled] if pooled else [])
    folders = ", ".join(f"`{r['dir']}` ({r['label']})" for r in runs)
    missing = [r["label"] for r in runs if r["contrasts"] is None]
    note = (f"\n\nNo paired intervals for {', '.join(missing)}: no per-example predictions.json with `{system}`'s "
            f"{decision} ratings in that run folder." if missing else "")
    rule = ("the argmax of the five-rating distribution (the LaMP protocol)" if decision == "argmax" else
            "the median of the five-rating distribution (the Bayes decision for absolute error)")
    how = (f"The LLM systems' rating: {rule}. "
           f"Paired bootstrap on the same test ratings: mean of |error| of {system} minus |error| of the baseline "
           f"(negative = {system} better) ± its bootstrap SE, 95% percentile interval ({n_boot} resamples of the "
           f"test ratings, seed {seed}); 'better'/'worse' only where the interval excludes 0, else 'tie'."
           + (" `pooled`: every seed's test ratings as one sample (a user drawn in two seeds counts twice, so its "
              "interval is slightly optimistic)." if pooled else ""))
    return (f"Runs: {folders}.{note}\n\n"
            f"### Systems per seed\n\n{seed_summary_table(runs)}\n\n"
            f"### {system} against each baseline, all test ratings\n\n{how}\n\n"
            f"{overall_contrast_table(contrast_runs, system)}"
            f"\n\n### {system} against each baseline, by training-profile size (sparse users first)\n\n"
            f"{bucket_contrast_tables(contrast_runs, system) or '(no per-example predictions)'}\n\n"
            f"### Test ratings and users per seed\n\n{counts_table(runs)}\n")
