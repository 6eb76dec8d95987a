"""The classic rating baselines: user_mean, user_median, item_mean and the biased matrix factorisation row mf_svd."""
from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest

from proper import data as D
from proper.training.evaluation import classic_baselines, mf_svd_predictions

pytest.importorskip("surprise")


def _planted(n_users=40, n_items=30, n_test=5, seed=0) -> D.Dataset:
    """Every user rates every item: rating = round(3 + user bias + item bias), clipped to 1..5. A user's mean
    cannot see the item bias of the held-out items; a model with item biases can."""
    rng = random.Random(seed)
    item_bias = [rng.choice((-1.5, -0.5, 0.5, 1.5)) for _ in range(n_items)]
    users = OrderedDict()
    for u in range(n_users):
        bu = rng.choice((-1.0, 0.0, 1.0))
        items = list(range(n_items))
        rng.shuffle(items)
        exs = [D.Example(f"u{u}", f"item {i}", str(int(np.clip(round(3 + bu + item_bias[i]), 1, 5))), float(t),
                         {"item": i}) for t, i in enumerate(items)]
        users[f"u{u}"] = D.UserSplit(f"u{u}", exs[:-n_test], [], exs[-n_test:])
    return D.Dataset("planted", "rating", users)


def test_mf_svd_beats_user_mean_on_planted_item_biases():
    ds = _planted()
    preds = {}
    rows = classic_baselines(ds, ds.examples("test"), preds, seed=0)
    assert list(rows) == ["user_mean", "user_median", "item_mean", "mf_svd"]
    assert rows["mf_svd"]["n"] == len(ds.examples("test")) == 200
    assert rows["mf_svd"]["unseen_users"] == 0 and rows["mf_svd"]["unseen_items"] == 0
    assert rows["mf_svd"]["mae"] < 0.5 * rows["user_mean"]["mae"], (rows["mf_svd"]["mae"], rows["user_mean"]["mae"])
    assert len(preds["mf_svd"]["pred"]) == 200 and all(1 <= p <= 5 for p in preds["mf_svd"]["pred"])
    assert set(rows["mf_svd"]["buckets"]) == {"21-50"}


def test_mf_svd_is_deterministic_for_a_seed():
    ds = _planted()
    a, _ = mf_svd_predictions(ds.examples("train"), ds.examples("test"), seed=3)
    b, _ = mf_svd_predictions(ds.examples("train"), ds.examples("test"), seed=3)
    c, _ = mf_svd_predictions(ds.examples("train"), ds.examples("test"), seed=4)
    assert a == b
    assert a != c          # the seed reaches the factor initialisation


def test_mf_svd_unseen_users_and_items_fall_back_and_are_counted():
    ds = _planted(n_users=6, n_items=8, n_test=2)
    train = ds.examples("train")
    test = [D.Example("stranger", "x", "3", 0.0, {"item": 999}), D.Example("u0", "y", "3", 0.0, {"item": 999}),
            ds.examples("test")[0]]
    pred, counts = mf_svd_predictions(train, test, seed=0)
    assert counts == {"unseen_users": 1, "unseen_items": 2}
    glob = float(np.mean([float(ex.target) for ex in train]))
    assert pred[0] == pytest.approx(glob, rel=1e-12)     # nothing known: surprise's global mean
    assert 1 <= pred[1] <= 5 and 1 <= pred[2] <= 5


def test_classic_baselines_without_items_have_no_mf_row():
    ds = _planted(n_users=3, n_items=6, n_test=2)
    for s in ds.users.values():
        for sp in D.SPLITS:
            s[sp][:] = [D.Example(e.user, e.input, e.target, e.time) for e in s[sp]]
    assert list(classic_baselines(ds, ds.examples("test"))) == ["user_mean", "user_median"]


def test_surprise_is_imported_only_by_the_baseline():
    import subprocess
    import sys

    code = "import sys, proper, proper.training, proper.training.evaluation; print('surprise' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_user_median_is_each_users_median_training_rating():
    ds = _planted(n_users=6, n_items=9, n_test=2)
    preds = {}
    classic_baselines(ds, ds.examples("test"), preds, seed=0)
    for ex, p in zip(ds.examples("test"), preds["user_median"]["pred"]):
        assert p == float(np.median([float(t.target) for t in ds.users[ex.user].train]))
    assert preds["user_median"]["pred"] != preds["user_mean"]["pred"]   # the planted ratings are skewed
