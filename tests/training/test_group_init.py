"""The rating-cluster start of the group assignments (training/group_init.py)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

import proper
from proper import data as D
from proper.training.group_init import _beta_for, init_groups_from_ratings, rating_features
from proper_fixtures import tiny_llama


def _dataset(ratings_per_user, task="rating"):
    users = OrderedDict()
    for i, rs in enumerate(ratings_per_user):
        u = f"u{i}"
        users[u] = D.UserSplit(u, train=[D.Example(u, f"movie {j}", str(r)) for j, r in enumerate(rs)])
    return D.Dataset("synthetic", task, users)


def test_features_are_histograms_shrunk_toward_the_population():
    ds = _dataset([[5] * 40, [1] * 40, [5]])
    f = rating_features(ds, prior=5.0)
    assert f.shape == (3, 5) and np.allclose(f.sum(1), 1.0)
    pop = np.array([40, 0, 0, 0, 41]) / 81
    assert np.allclose(f[2], (np.eye(5)[4] + 5 * pop) / 6)      # one rating: mostly the population's histogram
    assert f[0, 4] > 0.85 and f[1, 0] > 0.85                     # heavy raters keep their own


def test_users_who_rate_alike_start_in_the_same_group():
    ds = _dataset([[5, 5, 4] * 10, [5, 4, 5] * 10, [1, 2, 1] * 10, [2, 1, 1] * 10, [3] * 30, [3, 3, 4] * 10])
    m = tiny_llama()
    proper.apply_proper(m, proper.ProperConfig(num_users=len(ds), num_experts=3, expert_rank=4, user_rank=2, top_k=2))
    report = init_groups_from_ratings(m, ds, seed=0, confidence=0.8)
    assert sorted(report["cluster_sizes"]) == [2, 2, 2]
    g = proper.user_gates(m, list(range(len(ds))), "group")[0]      # [U, K]: one assignment for every layer
    top = g.argmax(-1)
    assert top[0] == top[1] and top[2] == top[3] and top[4] == top[5] and len(set(top.tolist())) == 3
    p = torch.softmax(proper.get_state(m).router.logits(torch.arange(len(ds))), -1)
    assert abs(float(p.max(-1).values.mean()) - 0.8) < 1e-3       # beta calibrated to the asked confidence
    assert init_groups_from_ratings(m, _dataset([[1]] * 6, task="generation"), seed=0) is None
    with pytest.raises(ValueError, match="confidence"):
        init_groups_from_ratings(m, ds, seed=0, confidence=0.2)


def test_beta_bisection_hits_the_target():
    d2 = np.random.default_rng(0).random((50, 4))
    beta = _beta_for(d2, 0.6)
    z = -beta * (d2 - d2.min(1, keepdims=True))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert abs(p.max(1).mean() - 0.6) < 1e-6


def test_select_by_mae_lets_the_loss_break_ties_only():
    from proper.training import TrainConfig
    from proper.training.trainer import _improves

    assert _improves([0.80, 1.60], [0.90, 1.50])          # lower MAE wins whatever the loss
    assert not _improves([0.95, 1.00], [0.90, 2.00])
    assert _improves([0.90, 1.40], [0.90, 1.50])          # equal MAE: the loss decides
    assert not _improves([0.90, 1.4999], [0.90, 1.50])
    assert _improves([1.40], [1.50]) and not _improves([1.4999], [1.50])
    assert _improves([0.8, 1.4], [1.5])                   # a checkpoint of a loss-selected run: compare losses
    assert TrainConfig().resolved().select_by == "mae" and TrainConfig(budget="tiny").resolved().select_by == "loss"
    with pytest.raises(ValueError, match="--select-by"):
        TrainConfig(select_by="rmse").resolved()
    with pytest.raises(ValueError, match="--group-init"):
        TrainConfig(group_init="kmeans").resolved()
