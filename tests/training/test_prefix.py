"""The frozen-prefix cache of scoring passes (proper/training/prefix.py): the same hidden states as the full
decoder, read back instead of recomputed, refused where it could be wrong."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import proper
from proper import data as D
from proper import training as T
from proper.training.losses import hidden_states, lm_loss
from proper.training.prefix import FrozenPrefix, first_adapted_layer
from tests.proper_fixtures import randomize_b, tiny_llama


def _patched(layers=4, adapted=(2, 3), **cfg_kw):
    """A tiny Llama with PROPER (K = 2 experts, 3 users) on the MLP projections of ``adapted`` layers only."""
    idx = "|".join(map(str, adapted))
    cfg = proper.ProperConfig(num_users=3, num_experts=2, top_k=0, user_rank=2, expert_rank=2,
                              target_modules=rf"(.*\.)?layers\.({idx})\.mlp\.(gate_proj|up_proj|down_proj)", **cfg_kw)
    m = proper.apply_proper(tiny_llama(layers=layers), cfg)
    randomize_b(m, std=0.3)
    proper.set_stage(m, "user", init_experts=False)
    return m


def _batch(lengths, seed=0, vocab=64):
    """Right-padded ids / mask with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def _full(m, ids, mask, rows):
    with torch.no_grad(), proper.users(m, rows):
        return hidden_states(m, ids, mask)


def _cached(m, pf, ids, mask, rows):
    with torch.no_grad(), proper.users(m, rows):
        return hidden_states(m, ids, mask, pf)


def test_split_is_the_lowest_adapted_layer_and_none_where_nothing_is_below_it():
    assert first_adapted_layer(_patched(adapted=(2, 3))) == 2
    assert FrozenPrefix.for_model(_patched(adapted=(2, 3))).split == 2
    assert FrozenPrefix.for_model(_patched(adapted=(0, 3))) is None    # an adapter in the first layer
    m = _patched(adapted=(2, 3))
    m.config.attention_dropout = 0.1                                  # the bottom would differ pass to pass
    assert FrozenPrefix.for_model(m) is None


def test_cached_states_equal_the_full_decoder_and_are_read_back(monkeypatch):
    m = _patched()
    pf = FrozenPrefix.for_model(m)
    ids, mask = _batch([7, 3, 5, 1])
    rows = torch.tensor([0, 2, -1, 1])
    full = _full(m, ids, mask, rows)
    got = _cached(m, pf, ids, mask, rows)
    real = mask.bool()
    assert pf.enabled and pf.checked and len(pf.states) == 4
    torch.testing.assert_close(got[real], full[real], rtol=0, atol=1e-6)   # fp32: the prefix at another length
    # a second pass over the same sequences, in another batch (other order, other padding) and with other users,
    # reads every prefix back: the bottom layers do not run
    monkeypatch.setattr(pf, "_bottom", lambda *a: pytest.fail("the bottom layers ran for a cached sequence"))
    perm = [3, 1, 0, 2]
    ids2, mask2 = ids[perm], mask[perm]
    rows2 = torch.tensor([1, 1, 0, 2])
    got2 = _cached(m, pf, ids2, mask2, rows2)
    full2 = _full(m, ids2, mask2, rows2)
    torch.testing.assert_close(got2[mask2.bool()], full2[mask2.bool()], rtol=0, atol=1e-6)
    # the users' adapters still act on a cached prefix: sequence 1 now scored for user 1 instead of user 2
    assert not torch.allclose(got2[1, :3], got[1, :3], atol=1e-3)


def test_only_scoring_reads_the_cache_gradients_take_the_full_path():
    m = _patched()
    pf = FrozenPrefix.for_model(m)
    ids, mask = _batch([6, 4])
    labels = ids.masked_fill(mask == 0, -100)
    batch = (ids, mask, labels, torch.tensor([0, 1]))
    assert torch.is_grad_enabled() and not pf.usable()
    m.zero_grad()
    lm_loss(m, batch, pf).backward()
    g_with = [p.grad.clone() for p in proper.trainable_parameters(m)]
    m.zero_grad()
    lm_loss(m, batch).backward()
    g_without = [p.grad.clone() for p in proper.trainable_parameters(m)]
    assert len(pf.states) == 0                                         # training never filled it
    for a, b in zip(g_with, g_without):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="scoring only"):
        pf.hidden_states(ids, mask)


def test_an_unfrozen_bottom_layer_turns_the_cache_off_for_that_pass():
    m = _patched()
    pf = FrozenPrefix.for_model(m)
    ids, mask = _batch([5, 5])
    rows = torch.tensor([0, 1])
    _cached(m, pf, ids, mask, rows)
    assert len(pf.states) == 2
    w = m.get_decoder().layers[0].mlp.up_proj.weight
    w.requires_grad_(True)                       # someone trains a bottom layer: the cache may be stale
    with torch.no_grad():
        w.mul_(1.5)
    assert not pf.usable()
    torch.testing.assert_close(_cached(m, pf, ids, mask, rows), _full(m, ids, mask, rows), rtol=0, atol=0)


def test_the_byte_cap_stops_adding_states():
    m = _patched()
    one = 5 * 32 * 4                             # a 5-token state of the tiny model, fp32
    pf = FrozenPrefix.for_model(m, max_bytes=2 * one)
    ids, mask = _batch([5, 5, 5], seed=3)
    got = _cached(m, pf, ids, mask, torch.tensor([0, 1, 2]))
    assert len(pf.states) == 2 and pf.bytes == 2 * one
    torch.testing.assert_close(got, _full(m, ids, mask, torch.tensor([0, 1, 2])), rtol=0, atol=1e-6)


def test_a_prefix_that_does_not_reproduce_the_forward_is_switched_off(caplog):
    m = _patched()
    pf = FrozenPrefix.for_model(m)
    top = pf._top
    pf._top = lambda h, mask: top(h + 1.0, mask)  # a decoder that does not start from inputs_embeds as given
    ids, mask = _batch([4, 2])
    rows = torch.tensor([0, 1])
    with caplog.at_level(logging.WARNING, logger="proper.train"):
        got = _cached(m, pf, ids, mask, rows)
    assert not pf.enabled and "prefix cache off" in caplog.text and not pf.states
    torch.testing.assert_close(got, _full(m, ids, mask, rows), rtol=0, atol=0)


def test_a_shared_cache_serves_a_second_model_with_the_same_base():
    a = _patched()
    b = copy.deepcopy(a)
    randomize_b(b, std=0.3, seed=5)              # other adapters, same frozen bottom
    pa = FrozenPrefix.for_model(a)
    pb = FrozenPrefix.for_model(b, share=pa)
    ids, mask = _batch([6, 3])
    rows = torch.tensor([0, 2])
    _cached(a, pa, ids, mask, rows)
    assert pb.states is pa.states and len(pb.states) == 2
    real = mask.bool()                           # (padded positions are never read: their states differ)
    torch.testing.assert_close(_cached(b, pb, ids, mask, rows)[real], _full(b, ids, mask, rows)[real], rtol=0,
                               atol=1e-6)
    assert FrozenPrefix.for_model(_patched(adapted=(1, 3)), share=pa).states is not pa.states   # other split


# ------------------------------------------------------------------------------------------ a run, end to end
@pytest.mark.slow
def test_a_run_scores_the_same_with_and_without_the_cache(tmp_path):
    pytest.importorskip("proper.models")
    try:
        base, tok = T.load_model(num_layers=3)
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    ds = D.select_users(D.load_movielens_100k(), 4, seed=1)
    out = {}
    for on in (True, False):
        cfg = T.TrainConfig(out=str(tmp_path / str(on)), budget="tiny", max_users=4, seed=1, num_layers=3,
                            lora_layers=1, batch_size=4, steps_population=2, steps_group=2, steps_user=2,
                            eval_every=2, patience=100, num_experts=2, top_k=0, expert_rank=4, user_rank=2,
                            max_history=4, dev_max=4, test_max=6, eval_batch_size=8, prefix_cache=on,
                            ablations=("population+user",))
        out[on] = T.run_train(cfg, model_loader=lambda: (copy.deepcopy(base), tok), dataset=ds, progress=False)
    for name, r in out[False]["systems"].items():
        c = out[True]["systems"][name]
        assert c["mae"] == r["mae"], name
        if "nll" in r:
            assert c["nll"] == pytest.approx(r["nll"], rel=1e-5), name
    hist = [json.loads((tmp_path / str(on) / "history.json").read_text()) for on in (True, False)]
    for stage in ("population", "group", "user"):
        for a, b in zip(hist[0][stage]["evals"], hist[1][stage]["evals"]):
            assert a["dev_loss"] == pytest.approx(b["dev_loss"], rel=1e-5)
