"""A data-driven start for the group assignments: users clustered by their own training ratings.

Why: the K experts start as copies of the population LoRA, so at the group stage's first step every expert
computes the same thing, the router's gradient is zero, and the experts drift apart only through the random gate
mix each user starts with. On MovieLens dev that group stage only overfits (RESULTS.md: the dev loss rises in
every variant tried). Starting each user's gates at a cluster of users who rate alike breaks the symmetry with the
signal groups are meant to carry: each expert starts training on a coherent set of users, and the router refines
the assignment from there (it keeps training at the router learning rate).

Features: each user's histogram over the rating labels of its training examples, shrunk toward the population's
histogram with ``prior`` pseudo-counts, so a user with three ratings lands near the population instead of
defining a cluster by noise. Clusters: scikit-learn's KMeans (k = K, seeded, 10 starts). Gates: user u's logits
are -beta * ||f_u - c_k||^2 (:func:`proper.set_router_logits`), beta set by bisection so that the mean largest
gate (before top-k) is ``confidence``: soft, so the second-nearest group is the one top-2 also keeps.

Rating tasks only (the labels are the targets); a generation task keeps the random start.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import data as D
from ..routing import set_router_logits
from ..state import get_state


def rating_features(ds: D.Dataset, prior: float = 5.0) -> np.ndarray:
    """[num_users, len(RATINGS)] each user's shrunk rating histogram (rows sum to 1), in the dataset's user order."""
    labels = list(D.RATINGS)
    pos = {r: i for i, r in enumerate(labels)}
    counts = np.zeros((len(ds), len(labels)))
    for i, u in enumerate(ds.user_list):
        for ex in ds.users[u].train:
            if ex.target in pos:
                counts[i, pos[ex.target]] += 1
    pop = counts.sum(0) / max(counts.sum(), 1.0)
    return (counts + prior * pop) / (counts.sum(1, keepdims=True) + prior)


def _logits(d2: np.ndarray, beta: float) -> np.ndarray:
    """-beta * d2, shifted so each row's largest logit is 0 (the same softmax, no overflow)."""
    return -beta * (d2 - d2.min(1, keepdims=True))


def _beta_for(d2: np.ndarray, confidence: float) -> float:
    """The beta at which the mean over users of max_k softmax(-beta d2[u]) is `confidence` (monotone in beta)."""
    def mean_max(beta: float) -> float:
        z = _logits(d2, beta)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return float(p.max(1).mean())

    lo, hi = 0.0, 1.0
    while mean_max(hi) < confidence and hi < 1e12:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_max(mid) < confidence else (lo, mid)
    return hi


def init_groups_from_ratings(model, ds: D.Dataset, seed: int, *, confidence: float = 0.75,
                             prior: float = 5.0) -> Optional[Dict[str, Any]]:
    """Start the user-aware router's gates at rating clusters (module docstring); returns a report (cluster
    sizes, beta, confidence), or None where it does not apply (not a rating task, K < 2, or fewer users than K)."""
    from sklearn.cluster import KMeans   # (the `data` extra; only this start needs it)

    state = get_state(model)
    K = state.cfg.num_experts
    if ds.task != "rating" or K < 2 or len(ds) < K:
        return None
    if not 1.0 / K < confidence < 1.0:
        raise ValueError(f"confidence must be in (1/K, 1) = ({1.0 / K:.3f}, 1), got {confidence}")
    f = rating_features(ds, prior)
    km = KMeans(n_clusters=K, n_init=10, random_state=seed).fit(f)
    d2 = ((f[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)   # [U, K]
    beta = _beta_for(d2, confidence)
    logits = _logits(d2, beta)
    set_router_logits(model, range(len(ds)), torch.as_tensor(logits, dtype=torch.float32))
    sizes: List[int] = np.bincount(km.labels_, minlength=K).tolist()
    labels = np.asarray([float(r) for r in D.RATINGS])
    return {"how": "ratings", "cluster_sizes": sizes, "beta": beta, "confidence": confidence, "prior": prior,
            "cluster_mean_rating": [round(float(c @ labels), 3) for c in km.cluster_centers_]}
