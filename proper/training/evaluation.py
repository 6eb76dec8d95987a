"""Scoring: next-token ratings, LM loss, MAE/RMSE and ROUGE by profile size, the classic baselines (user
mean, item mean, biased matrix factorisation) and the group report."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import data as D
from . import distributed as DD

from ..context import users
from ..routing import user_gates as _routing_gates
from .batches import Encoded, collate
from .losses import hidden_states, lm_loss

# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score_next_token(model, items: Sequence[Encoded], pad_id: int, batch_size: int,
                     candidate_ids: Optional[Sequence[int]] = None, prefix=None) -> Dict[str, np.ndarray]:
    """For each example, the distribution of the first target token after its prompt.

    Returns ``nll`` (full-vocabulary -log p of the true first target token) and, with ``candidate_ids``,
    ``probs`` [N, C] renormalised over the candidates (the rating tokens). ``prefix``: a prefix.FrozenPrefix
    (the unadapted bottom layers' states cached across passes)."""
    was = model.training
    model.eval()
    nll, probs = [], []
    items = DD.shard(items)   # each rank scores its slice; gathered back in order below
    try:
        for s in range(0, len(items), batch_size):
            chunk = items[s: s + batch_size]
            ids, mask, _, rows = collate(chunk, pad_id, prompt_only=True)
            with users(model, rows):
                h = hidden_states(model, ids, mask, prefix)
            last = h[torch.arange(len(chunk)), mask.sum(1) - 1]
            logits = model.get_output_embeddings()(last).float()
            tgt = torch.tensor([it.ids[it.n_prompt] for it in chunk])
            nll.append(-torch.log_softmax(logits, -1).gather(1, tgt[:, None])[:, 0])
            if candidate_ids is not None:
                probs.append(torch.softmax(logits[:, list(candidate_ids)], -1))
    finally:
        model.train(was)
    out = {"nll": np.asarray(DD.gather_sharded(torch.cat(nll).tolist() if nll else []), dtype=np.float64)}
    if candidate_ids is not None:
        rows = DD.gather_sharded(torch.cat(probs).tolist() if probs else [])
        out["probs"] = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(candidate_ids))
    return out


@torch.no_grad()
def mean_lm_loss(model, items: Sequence[Encoded], pad_id: int, batch_size: int, prefix=None) -> float:
    """L_lm averaged over all target tokens of ``items`` (no gradients; ``prefix``: see score_next_token)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    items = DD.shard(items)
    try:
        for s in range(0, len(items), batch_size):
            b = collate(items[s: s + batch_size], pad_id)
            k = int((b[2][:, 1:] != -100).sum())
            tot += float(lm_loss(model, b, prefix)) * k
            n += k
    finally:
        model.train(was)
    tot, n = DD.all_reduce_sum([tot, n])
    return tot / max(n, 1)


def median_rating(probs: np.ndarray) -> np.ndarray:
    """[N] the median of each row's distribution over the ratings 1..C (``probs`` [N, C]): the smallest rating
    whose cumulative probability reaches 1/2. Under absolute error it is the Bayes decision (the argmax is the
    decision for 0-1 loss, the LaMP protocol's; the expectation the one for squared error)."""
    probs = np.asarray(probs, np.float64)
    cdf = np.cumsum(probs, axis=-1)
    return (cdf < 0.5 * cdf[:, -1:]).sum(-1) + 1


def rating_metrics(y_true: Sequence[float], y_pred: Sequence[float], sizes: Sequence[int],
                   y_expected: Optional[Sequence[float]] = None,
                   y_median: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """MAE/RMSE (scikit-learn), overall and per profile-size bucket (data.profile_bucket); with ``y_expected`` /
    ``y_median`` (the expectation / median of an LLM's rating distribution) also ``mae_expected`` ...
    ``rmse_median``."""
    from sklearn.metrics import mean_absolute_error, root_mean_squared_error

    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    extra = {k: np.asarray(v, float) for k, v in (("expected", y_expected), ("median", y_median)) if v is not None}

    def block(idx):
        d = {"mae": float(mean_absolute_error(y_true[idx], y_pred[idx])),
             "rmse": float(root_mean_squared_error(y_true[idx], y_pred[idx])), "n": int(len(idx))}
        for k, v in extra.items():
            d[f"mae_{k}"] = float(mean_absolute_error(y_true[idx], v[idx]))
            d[f"rmse_{k}"] = float(root_mean_squared_error(y_true[idx], v[idx]))
        return d

    return _with_buckets(block, len(y_true), sizes)


def _with_buckets(block: Callable[[np.ndarray], Dict[str, Any]], n: int, sizes: Sequence[int]) -> Dict[str, Any]:
    """block(all rows), plus "buckets": block(rows) per profile-size bucket (data.profile_bucket), in
    BUCKET_ORDER."""
    out = block(np.arange(n))
    buckets: Dict[str, List[int]] = {}
    for i, s in enumerate(sizes):
        buckets.setdefault(D.profile_bucket(s), []).append(i)
    out["buckets"] = {b: block(np.asarray(buckets[b])) for b in D.BUCKET_ORDER if b in buckets}
    return out


def rouge_metrics(refs: Sequence[str], preds: Sequence[str], sizes: Sequence[int]) -> Dict[str, Any]:
    """ROUGE-1 / ROUGE-L F1 (rouge-score, stemmed), overall and per profile-size bucket."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = [], []
    for r, p in zip(refs, preds):
        s = sc.score(r, p)
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    r1, rl = np.asarray(r1), np.asarray(rl)

    def block(idx):
        return {"rouge1": float(r1[idx].mean()), "rougeL": float(rl[idx].mean()), "n": int(len(idx))}

    return _with_buckets(block, len(r1), sizes)


def classic_baselines(dataset: D.Dataset, test: Sequence[D.Example],
                      predictions: Optional[Dict[str, Any]] = None, *, seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """user_mean, user_median, item_mean and mf_svd (biased matrix factorisation, :func:`mf_svd_predictions`) on
    the test examples (rating data only); item_mean and mf_svd need ``meta["item"]`` on the examples. ``seed`` seeds
    the factorisation. Their per-example predictions go into ``predictions[name]["pred"]`` when a dict is given."""
    train = dataset.examples("train")
    glob = float(np.mean([float(ex.target) for ex in train]))
    by_user: Dict[str, List[float]] = {}
    by_item: Dict[Any, List[float]] = {}
    for ex in train:
        by_user.setdefault(ex.user, []).append(float(ex.target))
        if "item" in ex.meta:
            by_item.setdefault(ex.meta["item"], []).append(float(ex.target))
    y = [float(ex.target) for ex in test]
    sizes = [dataset.users[ex.user].profile_size for ex in test]
    # user_median: the MAE-optimal constant per user (the baseline to hold the median decision rule against)
    preds = {"user_mean": [float(np.mean(by_user.get(ex.user, [glob]))) for ex in test],
             "user_median": [float(np.median(by_user.get(ex.user, [glob]))) for ex in test]}
    unseen: Dict[str, Dict[str, int]] = {}
    if by_item:
        preds["item_mean"] = [float(np.mean(by_item[ex.meta.get("item")])) if ex.meta.get("item") in by_item
                              else glob for ex in test]
        unseen["item_mean"] = {"unseen_items": sum(ex.meta.get("item") not in by_item for ex in test)}
        preds["mf_svd"], unseen["mf_svd"] = mf_svd_predictions(train, test, seed=seed)
    out = {name: rating_metrics(y, p, sizes) for name, p in preds.items()}
    for name, counts in unseen.items():
        out[name].update(counts)
    if predictions is not None:
        predictions.update({name: {"pred": p} for name, p in preds.items()})
    return out


#: scikit-surprise's SVD defaults, spelled out so a run's row says what was fitted.
MF_SVD_PARAMS = dict(n_factors=100, n_epochs=20, lr_all=0.005, reg_all=0.02, biased=True)


def mf_svd_predictions(train: Sequence[D.Example], test: Sequence[D.Example], *,
                       seed: int = 0) -> Tuple[List[float], Dict[str, int]]:
    """Biased matrix factorisation (scikit-surprise ``SVD``, :data:`MF_SVD_PARAMS`, ``random_state=seed``):
    the classic collaborative-filtering reference, fitted on exactly the ``train`` ratings PROPER trains on
    (user = ``ex.user``, item = ``ex.meta["item"]``). Returns the test predictions, clipped to [1, 5], and
    the counts of test examples whose user / item has no training rating (``unseen_users`` / ``unseen_items``:
    surprise falls back to the global mean plus whichever bias it knows)."""
    try:
        from surprise import SVD, Dataset, Reader
    except ImportError:
        raise ImportError("the mf_svd baseline needs scikit-surprise: pip install scikit-surprise==1.1.5 "
                          "(in the 'data' extra)") from None
    raw = [(str(ex.user), str(ex.meta["item"]), float(ex.target), None) for ex in train if "item" in ex.meta]
    # construct_trainset is what build_full_trainset runs; used directly so no pandas DataFrame is needed
    trainset = Dataset(Reader(rating_scale=(1, 5))).construct_trainset(raw)
    algo = SVD(random_state=seed, **MF_SVD_PARAMS)
    algo.fit(trainset)
    pred = [float(algo.predict(str(ex.user), str(ex.meta.get("item")), clip=True).est) for ex in test]
    users = {u for u, _, _, _ in raw}
    items = {i for _, i, _, _ in raw}
    return pred, {"unseen_users": sum(str(ex.user) not in users for ex in test),
                  "unseen_items": sum(str(ex.meta.get("item")) not in items for ex in test)}


# -------------------------------------------------------------------------------------------- the trainer
def user_gates(model, rows: torch.Tensor, stage: str) -> Optional[np.ndarray]:
    """[L, U, K] gates of each user in each layer as the ``stage`` routes them (None without experts)."""
    g = _routing_gates(model, rows, stage)
    return None if g is None else g.numpy()


def group_report(gates: np.ndarray, users: Sequence[str]) -> Dict[str, Any]:
    """Per-user gates (mean over layers), top group and entropy (nats), plus a summary."""
    mean = gates.mean(0)                                          # [U, K]
    ent = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(-1)
    layer_ent = -(gates * np.log(np.clip(gates, 1e-12, None))).sum(-1).mean(0)
    K = mean.shape[-1]
    top = mean.argmax(-1)
    per_user = {u: {"gates": [round(float(v), 5) for v in mean[i]], "group": int(top[i]),
                    "entropy": float(ent[i]), "mean_layer_entropy": float(layer_ent[i])}
                for i, u in enumerate(users)}
    return {"num_experts": K, "max_entropy": math.log(K), "mean_entropy": float(ent.mean()),
            "mean_layer_entropy": float(layer_ent.mean()),
            "group_sizes": [int((top == k).sum()) for k in range(K)], "users": per_user}



def spread(items: Sequence, n: Optional[int]) -> List:
    """At most n items spread evenly over the list (all when n is None)."""
    items = list(items)
    if n is None or len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(mininterval=1.0, **kw)


def fmt_system(r: Dict[str, Any]) -> str:
    if "mae" in r:
        s = f"MAE {r['mae']:.4f}  RMSE {r['rmse']:.4f}"
        if "mae_expected" in r:
            s += f"  (expected: MAE {r['mae_expected']:.4f} RMSE {r['rmse_expected']:.4f})"
        if "mae_median" in r:
            s += f"  (median: MAE {r['mae_median']:.4f})"
        return s + f"  n={r['n']}"
    return f"ROUGE-1 {r['rouge1']:.4f}  ROUGE-L {r['rougeL']:.4f}  n={r['n']}"



def summary_table(metrics: Dict[str, Any]) -> str:
    """The readable end-of-run summary: one line per system."""
    lines = [f"{'system':<32} metric"]
    for name, r in metrics["systems"].items():
        lines.append(f"{name:<32} {fmt_system(r)}")
    return "\n".join(lines)

