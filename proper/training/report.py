"""Readable results of a ``proper train`` run: markdown tables and a plot of error by user profile size.

    proper eval RUN_DIR --report RUN_DIR/results.md      # writes results.md and results_by_profile.png
    proper eval RUN_A RUN_B RUN_C --report RESULTS_tables.md   # several seeds: training/results.py

Everything comes from RUN_DIR/metrics.json, so the tables of RESULTS.md can be regenerated from a run folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data import BUCKET_ORDER, profile_bucket

#: The sparse users' bucket (<= 20 training ratings): reported first in every paired table.
SPARSE_BUCKET = profile_bucket(20)
#: Order of the paired tables' scopes: all test ratings, the sparse bucket, then the other buckets.
SCOPE_ORDER = ("all", SPARSE_BUCKET) + tuple(b for b in BUCKET_ORDER if b != SPARSE_BUCKET)

#: What each system is, in one line (rows of the results table, in this order; unknown names follow).
SYSTEMS = {
    "user_mean": "the user's mean training rating (classic baseline)",
    "user_median": "the user's median training rating (the classic baseline that minimises absolute error)",
    "item_mean": "the movie's mean training rating over the selected users",
    "mf_svd": "biased matrix factorisation (scikit-surprise SVD, defaults) on the same training ratings",
    "base": "SmolLM2-135M-Instruct, untouched",
    "population": "stage 1: one LoRA trained on every user",
    "group": "stage 2: K experts + user-aware router",
    "population+user": "ablation: population LoRA + per-user LoRA (no groups)",
    "proper_no_lora_router": "ablation: experts + user LoRAs added with w = 1 (no LoRA-aware router)",
    "proper": "stage 3: PROPER (experts + user LoRAs + LoRA-aware router)",
    "proper_router_off_at_inference": "PROPER with its LoRA-aware router switched off at inference",
    "proper_cold_start": "PROPER, every test user treated as unknown (no user LoRA, average gates)",
}


def load_metrics(run_dir) -> Dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run `proper train --out {run_dir}` first)")
    return json.loads(path.read_text())


def _order(systems: Dict[str, Any]) -> List[str]:
    return [s for s in SYSTEMS if s in systems] + [s for s in systems if s not in SYSTEMS]


def systems_table(metrics: Dict[str, Any]) -> str:
    """One row per system: overall metrics (rating: MAE/RMSE of the argmax rating and of the expectation)."""
    systems = metrics["systems"]
    rating = metrics.get("task", "rating") == "rating"
    if rating:
        best = min(r["mae"] for r in systems.values())
        lines = ["| system | MAE | RMSE | MAE (expected) | RMSE (expected) | n | what it is |",
                 "|---|---:|---:|---:|---:|---:|---|"]
        for name in _order(systems):
            r = systems[name]
            mae = f"**{r['mae']:.4f}**" if r["mae"] == best else f"{r['mae']:.4f}"
            me = f"{r['mae_expected']:.4f}" if "mae_expected" in r else "-"
            re = f"{r['rmse_expected']:.4f}" if "rmse_expected" in r else "-"
            lines.append(f"| {name} | {mae} | {r['rmse']:.4f} | {me} | {re} | {r['n']} | {SYSTEMS.get(name, '')} |")
    else:
        lines = ["| system | ROUGE-1 | ROUGE-L | n | what it is |", "|---|---:|---:|---:|---|"]
        for name in _order(systems):
            r = systems[name]
            lines.append(f"| {name} | {r['rouge1']:.4f} | {r['rougeL']:.4f} | {r['n']} | {SYSTEMS.get(name, '')} |")
    return "\n".join(lines)


def _metric_key(metrics: Dict[str, Any]) -> str:
    return "mae" if metrics.get("task", "rating") == "rating" else "rougeL"


def bucket_table(metrics: Dict[str, Any], key: Optional[str] = None) -> str:
    """Systems x profile-size buckets of ``key`` (MAE for ratings, ROUGE-L for generation)."""
    key = key or _metric_key(metrics)
    systems = metrics["systems"]
    buckets = [b for b in BUCKET_ORDER if any(b in r.get("buckets", {}) for r in systems.values())]
    first = next(iter(systems.values()))["buckets"]
    head = " | ".join(f"{b} (n={first[b]['n']})" if b in first else b for b in buckets)
    lines = [f"| system ({key}) by training-profile size | {head} |", "|---|" + "---:|" * len(buckets)]
    for name in _order(systems):
        bs = systems[name].get("buckets", {})
        lines.append(f"| {name} | " + " | ".join(f"{bs[b][key]:.3f}" if b in bs else "-" for b in buckets) + " |")
    return "\n".join(lines)


def plot_by_profile(metrics: Dict[str, Any], png, systems: Optional[List[str]] = None) -> Path:
    """Each system's error (rating: MAE of the argmax and RMSE of the expectation) by profile-size bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allsys = metrics["systems"]
    names = systems or [s for s in _order(allsys) if s not in ("proper_router_off_at_inference", "base")]
    rating = metrics.get("task", "rating") == "rating"
    panels = [("mae", "MAE (argmax rating)"), ("rmse_expected", "RMSE (expected rating)")] if rating \
        else [("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L")]
    buckets = [b for b in BUCKET_ORDER if any(b in allsys[n].get("buckets", {}) for n in names)]
    first = allsys[names[0]]["buckets"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels):
        for n in names:
            bs = allsys[n].get("buckets", {})
            k = key if any(key in bs.get(b, {}) for b in buckets) else key.replace("_expected", "")
            xs = [i for i, b in enumerate(buckets) if b in bs]
            style = dict(lw=2.6, marker="o") if n == "proper" else dict(lw=1.3, marker=".", alpha=0.85)
            if n in ("user_mean", "item_mean", "mf_svd"):
                style.update(ls="--")
            ax.plot(xs, [bs[buckets[i]][k] for i in xs], label=n, **style)
        ax.set_xticks(range(len(buckets)), [f"{b}\n(n={first[b]['n']})" if b in first else b for b in buckets])
        ax.set_xlabel("user's training-profile size (ratings)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
    d = metrics.get("data", {})
    better = "lower is better" if rating else "higher is better"
    fig.suptitle(f"{d.get('name', '')}: {d.get('users', '?')} users, {d.get('test_scored', '?')} test examples; "
                 f"{better}", fontsize=10)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def paired_bootstrap(err_a, err_b, n_boot: int = 5000, seed: int = 0) -> Dict[str, float]:
    """Mean of err_a - err_b over the same examples, its bootstrap standard error (``se``) and 95% percentile
    interval (examples resampled with replacement, both systems together). Resamples are drawn in blocks so a
    large test set needs no n_boot x n index matrix; the draws are the same as in one block."""
    import numpy as np

    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    d = np.asarray(err_a, float) - np.asarray(err_b, float)
    if d.ndim != 1 or not d.size:
        raise ValueError(f"err_a and err_b must be equal-length non-empty 1-D sequences, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // len(d))
    boots = np.concatenate([d[rng.integers(0, len(d), (min(block, n_boot - s), len(d)))].mean(1)
                            for s in range(0, n_boot, block)])
    return {"diff": float(d.mean()), "lo": float(np.percentile(boots, 2.5)), "hi": float(np.percentile(boots, 97.5)),
            "se": float(boots.std(ddof=1)) if n_boot > 1 else 0.0, "n": int(len(d))}


def verdict(b: Dict[str, float]) -> str:
    """"better" / "worse" (for a difference of errors: lower is better) only where the 95% interval excludes 0,
    else "tie"."""
    return "better" if b["hi"] < 0 else ("worse" if b["lo"] > 0 else "tie")


#: What PROPER is paired against, in table order: the classic rows, then the trained stages and the OPPU-style
#: population + independent per-user LoRA ablation.
BASELINES = ("user_mean", "user_median", "item_mean", "mf_svd", "population", "group", "population+user")

#: Decision rules of the LLM systems (the keys of their predictions.json entries): the argmax of the five-rating
#: distribution (the LaMP protocol, ``pred``), or its median (``median``: the Bayes decision for absolute error).
DECISIONS = {"argmax": "pred", "median": "median"}


def decided(entry: Dict[str, Any], key: str):
    """A system's predictions under the decision ``key``: a point predictor (the classic baselines: ``pred``
    only, no distribution) predicts the same under every rule; None where a distribution's system lacks ``key``
    (a run from before the median was recorded)."""
    if key in entry:
        return entry[key]
    return entry.get("pred") if "expected" not in entry else None


def load_predictions(run_dir) -> Optional[Dict[str, Any]]:
    """RUN_DIR/predictions.json (per-example targets and every system's predictions), or None without one."""
    path = Path(run_dir) / "predictions.json"
    return json.loads(path.read_text()) if path.is_file() else None


def bucket_scopes(sizes) -> List[tuple]:
    """[(label, example indices)] in SCOPE_ORDER: ``"all"``, then the sparse bucket ``"<=20"``, then the other
    profile-size buckets in BUCKET_ORDER (empty ones left out) -- the sparse users are where personalisation
    has to earn its keep, so they lead."""
    import numpy as np

    labels = [profile_bucket(int(n)) for n in sizes]
    scopes = [("all", np.arange(len(labels)))]
    for b in SCOPE_ORDER[1:]:
        idx = np.asarray([i for i, lab in enumerate(labels) if lab == b], dtype=int)
        if idx.size:
            scopes.append((b, idx))
    return scopes


def proper_vs_baselines(preds: Dict[str, Any], system: str = "proper", baselines=BASELINES, key: str = "pred",
                        n_boot: int = 5000, seed: int = 0) -> List[Dict[str, Any]]:
    """Paired bootstrap of |error| of ``system`` minus |error| of each baseline present in ``preds`` (the
    predictions.json dict), overall and per profile bucket (:func:`bucket_scopes` order). One row per
    (scope, baseline): ``scope``, ``baseline``, ``ratings``, ``users`` and the :func:`paired_bootstrap` keys."""
    import numpy as np

    ex = preds["examples"]
    y = np.asarray([float(e["target"]) for e in ex])
    sysp = {k: decided(v, key) for k, v in preds["systems"].items() if v is not None}
    sysp = {k: v for k, v in sysp.items() if v is not None}
    if system not in sysp:
        raise KeyError(f"system {system!r} has no {key!r} predictions (has: {sorted(sysp)})")
    err = {k: np.abs(np.asarray(v, float) - y) for k, v in sysp.items() if k == system or k in baselines}
    users = np.asarray([str(e["user"]) for e in ex])
    rows = []
    for scope, idx in bucket_scopes([e["profile_size"] for e in ex]):
        for b in (b for b in baselines if b in err and b != system):
            rows.append({"scope": scope, "baseline": b, "ratings": int(idx.size),
                         "users": int(len(set(users[idx]))),
                         **paired_bootstrap(err[system][idx], err[b][idx], n_boot=n_boot, seed=seed)})
    return rows


def fmt_ci(b: Dict[str, float]) -> str:
    return f"[{b['lo']:+.3f}, {b['hi']:+.3f}]"


def contrast_table(rows: List[Dict[str, Any]], system: str = "proper") -> str:
    """Markdown of :func:`proper_vs_baselines` rows: one line per (scope, baseline), scopes in row order."""
    lines = [f"| test ratings (users) | {system} - baseline | MAE diff | SE | 95% CI | verdict |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        scope = "all" if r["scope"] == "all" else f"profile {r['scope']}"
        lines.append(f"| {scope}: {r['ratings']} ({r['users']}) | {system} - {r['baseline']} | {r['diff']:+.3f} | "
                     f"{r['se']:.3f} | {fmt_ci(r)} | {verdict(r)} |")
    return "\n".join(lines)


def comparison_table(run_dir, against: str = "user_mean") -> Optional[str]:
    """Paired differences in absolute error (system - ``against``) with 95% bootstrap intervals, from
    RUN_DIR/predictions.json (rating runs); None when the run has no per-example predictions."""
    p = load_predictions(run_dir)
    if p is None:
        return None
    import numpy as np

    y = np.array([float(e["target"]) for e in p["examples"]])
    sysp = {k: v for k, v in p["systems"].items() if v is not None}
    if against not in sysp or not y.size:
        return None
    base_err = np.abs(np.asarray(sysp[against]["pred"], float) - y)
    lines = [f"| system | MAE - {against} MAE [95% CI] | MAE (expected) - {against} MAE [95% CI] |",
             "|---|---:|---:|"]
    for name in _order(sysp):
        if name == against:
            continue
        cells = []
        for key in ("pred", "expected"):
            if key not in sysp[name]:
                cells.append("-")
                continue
            b = paired_bootstrap(np.abs(np.asarray(sysp[name][key], float) - y), base_err)
            v = verdict(b)
            mark = "" if v == "tie" else f" ({v})"
            cells.append(f"{b['diff']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}]{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir, out_md, png: Optional[str] = None, metrics: Optional[Dict[str, Any]] = None) -> Path:
    """results markdown (run facts, systems table, bucket table, plot link) for the run in ``run_dir``
    (``metrics``: its metrics.json, when the caller has read it already)."""
    m = metrics if metrics is not None else load_metrics(run_dir)
    out_md = Path(out_md)
    png = Path(png) if png else out_md.with_name(out_md.stem + "_by_profile.png")
    plot_by_profile(m, png)
    cfg, d = m.get("config", {}), m.get("data", {})
    facts = (f"- data: {d.get('name')} - {d.get('users')} users (seed {cfg.get('seed')}), "
             f"{d.get('test_scored')} test / {d.get('dev_scored')} dev examples scored\n"
             f"- budget `{cfg.get('budget')}`: steps population/group/user = {cfg.get('steps_population')}/"
             f"{cfg.get('steps_group')}/{cfg.get('steps_user')}, batch {cfg.get('batch_size')}, "
             f"K={cfg.get('num_experts')} top-{cfg.get('top_k')}, expert rank {cfg.get('expert_rank')}, "
             f"user rank {cfg.get('user_rank')}, LoRAs on {', '.join(cfg.get('target_modules', []))} of the top "
             f"{cfg.get('lora_layers')} layers\n"
             f"- wall time of the run (after loading the model): {m.get('seconds_this_session', 0) / 60:.1f} min\n")
    try:
        rel = png.relative_to(out_md.parent)
    except ValueError:
        rel = png
    text = facts + "\n" + systems_table(m) + "\n\n" + bucket_table(m) + f"\n\n![error by profile size]({rel})\n"
    comp = comparison_table(run_dir) if m.get("task", "rating") == "rating" else None
    if comp:
        text += ("\nPaired against the user-mean baseline on the same test ratings (negative = lower error than "
                 "user_mean; 'better'/'worse' only where the 95% bootstrap interval excludes 0):\n\n" + comp + "\n")
    preds = load_predictions(run_dir) if m.get("task", "rating") == "rating" else None
    if preds is not None and "proper" in preds["systems"]:
        text += ("\nPROPER paired against each baseline on the same test ratings: mean of |error| of proper minus "
                 "|error| of the baseline (negative = PROPER better), its bootstrap SE and 95% percentile interval "
                 "(5000 resamples of the test ratings, seed 0); 'better'/'worse' only where the interval excludes "
                 "0. Overall, then by training-profile size, sparse users (<=20) first:\n\n"
                 + contrast_table(proper_vs_baselines(preds)) + "\n")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    return out_md
