"""proper.make_optimizer / ProperAdamW: a user's rows (adapter, router embedding, moments, step count) change only
on steps whose batch contains that user (lazy Adam), where torch.optim.AdamW drifts them through momentum; with
every user in every batch it is AdamW; its state survives torch.save + torch.load(weights_only=True)."""
from __future__ import annotations

import io

import pytest
import torch

import proper
from proper.state import TOUCHED_FOLD
from proper_fixtures import patched_llama

# user stage: the users' LoRAs are row-sparse; group stage: the user-aware router's embedding is
ROW_KEYS = {"user": ("user_a", "user_b"), "group": ("router.embedding.weight",)}
OPTS = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def _tokens(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 64, (b, 6), generator=g)


def _step(m, opt, ids, seed):
    x = _tokens(len(ids), seed)
    loss = m(x, labels=x, user_ids=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _row_tensors(m, stage):
    """{name: per-user tensor} of the stage's row-sparse parameters, every layer."""
    out = {}
    for name, layer in proper.proper_layers(m).items():
        ts = layer.adapter_tensors()
        out.update({f"{name}.{k}": ts[k] for k in ROW_KEYS[stage] if k in ts})   # (the model-level router
    assert out                                                                      # is in the first layer only)
    return out


def _rows(m, opt, stage, u):
    """User u's rows of every row-sparse parameter and of its optimizer state (cloned)."""
    snap = {}
    for n, p in _row_tensors(m, stage).items():
        snap[n] = p[u].detach().clone()
        for k, v in opt.state[p].items():
            snap[f"{n}:{k}"] = v[u].clone()
    return snap


BATCHES = [[2, 3], [2, 4], [0, 1], [0, 5], [1, 3]]   # user 2 in steps 1-2 only


@pytest.mark.parametrize("stage", ["user", "group"])
def test_no_drift_after_a_users_last_batch(stage):
    m = patched_llama(stage).train()
    opt = proper.make_optimizer(m, **OPTS)
    assert {g["name"] for g in opt.param_groups if g["row_sparse"]} == {"user": {"users"},
                                                                        "group": {"router_rows"}}[stage]
    for i, ids in enumerate(BATCHES[:2]):
        _step(m, opt, ids, i)
    u2, u0 = _rows(m, opt, stage, 2), _rows(m, opt, stage, 0)
    assert all(float(opt.state[p]["step"][2]) == 2 for p in _row_tensors(m, stage).values())
    for i, ids in enumerate(BATCHES[2:], 2):
        _step(m, opt, ids, i)
    after2, after0 = _rows(m, opt, stage, 2), _rows(m, opt, stage, 0)
    for k in u2:
        assert torch.equal(after2[k], u2[k]), k                          # not seen: bit-identical
    assert all(not torch.equal(after0[k], u0[k]) for k in u0)          # user 0 trained in steps 3-4


@pytest.mark.parametrize("stage", ["user", "group"])
def test_torch_adamw_does_drift(stage):
    """The same run under torch.optim.AdamW moves user 2 after its last batch (what the test above guards)."""
    m = patched_llama(stage).train()
    opt = torch.optim.AdamW(proper.trainable_parameters(m), **OPTS)
    for i, ids in enumerate(BATCHES[:2]):
        _step(m, opt, ids, i)
    before = {n: p[2].detach().clone() for n, p in _row_tensors(m, stage).items()}
    for i, ids in enumerate(BATCHES[2:], 2):
        _step(m, opt, ids, i)
    assert all(not torch.equal(p[2], before[n]) for n, p in _row_tensors(m, stage).items())


@pytest.mark.parametrize("stage, extra", [("user", {}), ("group", {}), ("user", dict(amsgrad=True, maximize=True))])
def test_every_user_in_every_batch_is_adamw(stage, extra):
    a, b = patched_llama(stage).train(), patched_llama(stage).train()
    oa = proper.make_optimizer(a, **OPTS, **extra)
    ob = torch.optim.AdamW(proper.trainable_parameters(b), **OPTS, **extra)
    everyone = list(range(6))
    for i in range(4):
        _step(a, oa, everyone, i)
        _step(b, ob, everyone, i)
    pb = dict(b.named_parameters())
    trained = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trained
    for n in trained:
        # bit-identical on CPU (torch's single-tensor AdamW there): the per-row bias corrections are formed in
        # fp64 like torch's Python floats and applied in torch's order of operations
        assert torch.equal(dict(a.named_parameters())[n], pb[n]), n
    for p in _row_tensors(a, stage).values():
        assert torch.equal(oa.state[p]["step"], torch.full((6,), 4.0))


def test_a_touched_user_with_zero_gradient_still_steps():
    """Being in the batch is what counts (no scan of gradient values): a zero-gradient user's step count
    advances, its moments decay and momentum moves it; a user outside the batch does not change."""
    m = patched_llama("user").train()
    opt = proper.make_optimizer(m, **OPTS)
    _step(m, opt, [2, 3], 0)
    before = _rows(m, opt, "user", 2)
    x = _tokens(2, 1)
    loss = m(x, labels=x, user_ids=[2, 3]).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in _row_tensors(m, "user").values():
        p.grad[2] = 0.0
    opt.step()
    after = _rows(m, opt, "user", 2)
    for n, p in _row_tensors(m, "user").items():
        assert float(opt.state[p]["step"][2]) == 2 and float(opt.state[p]["step"][5]) == 0
        torch.testing.assert_close(after[f"{n}:exp_avg"], OPTS["betas"][0] * before[f"{n}:exp_avg"])
        assert not torch.equal(after[n], before[n])


def test_gradient_accumulation_steps_the_union_and_ids_minus_one_touch_nothing():
    m = patched_llama("user").train()
    opt = proper.make_optimizer(m, **OPTS)
    for ids, seed in (([1, -1], 0), ([4], 1)):
        x = _tokens(len(ids), seed)
        m(x, labels=x, user_ids=ids).loss.backward()
    assert torch.equal(opt.touched_rows(), torch.tensor([1, 4]))
    opt.step()
    assert proper.get_state(m).touched == []                          # step() clears the record
    for p in _row_tensors(m, "user").values():
        assert opt.state[p]["step"].tolist() == [0, 1, 0, 0, 1, 0]


def test_group_stage_router_rows_of_absent_users_stay_fixed():
    """A cold-start (-1) sequence reads every user's embedding (the population-average gates), so every row gets
    a gradient; only the rows of the batch's users move."""
    m = patched_llama("group").train()
    opt = proper.make_optimizer(m, **OPTS)
    emb = _row_tensors(m, "group")
    before = {n: p.detach().clone() for n, p in emb.items()}
    x = _tokens(2)
    loss = m(x, labels=x, user_ids=[3, -1]).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    assert all(bool(p.grad[[0, 1, 2, 4, 5]].abs().sum(-1).gt(0).all()) for p in emb.values())
    opt.step()
    for n, p in emb.items():
        assert torch.equal(p[[0, 1, 2, 4, 5]], before[n][[0, 1, 2, 4, 5]]), n
        assert not torch.equal(p[3], before[n][3]), n


def test_state_dict_round_trip_resumes_exactly():
    full = patched_llama("user").train()
    of = proper.make_optimizer(full, **OPTS)
    for i, ids in enumerate(BATCHES):
        _step(full, of, ids, i)

    a = patched_llama("user").train()
    oa = proper.make_optimizer(a, **OPTS)
    for i, ids in enumerate(BATCHES[:2]):
        _step(a, oa, ids, i)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "optimizer": oa.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = patched_llama("user").train()
    b.load_state_dict(saved["model"])
    ob = proper.make_optimizer(b, **OPTS)
    ob.load_state_dict(saved["optimizer"])
    for i, ids in enumerate(BATCHES[2:], 2):
        _step(b, ob, ids, i)
    pf = dict(full.named_parameters())
    for n, p in b.named_parameters():
        assert torch.equal(p, pf[n]), n
    for p, q in zip(proper.trainable_parameters(b), proper.trainable_parameters(full)):
        for k in of.state[q]:
            assert torch.equal(ob.state[p][k], of.state[q][k]), k


def test_clear_errors():
    m = patched_llama("user").train()
    opt = proper.make_optimizer(m, **OPTS)
    with pytest.raises(ValueError, match="groups"):   # a plain AdamW's state has no row-sparse groups
        opt.load_state_dict(torch.optim.AdamW(proper.trainable_parameters(m)).state_dict())
    x = _tokens(1)
    m(x, labels=x, user_ids=[1]).loss.backward()
    with pytest.raises(ValueError, match="'touched'.*\\[-1, 6\\)"):
        opt.step(touched=[6])
    with pytest.raises(TypeError, match="'touched'"):
        opt.step(touched=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="'betas'"):
        proper.make_optimizer(m, betas=(0.9, 1.0))
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        proper.make_optimizer(m)


def test_the_record_folds_and_keeps_the_union():
    st = proper.get_state(patched_llama("user"))
    for i in range(TOUCHED_FOLD + 6):
        st.record_touched(torch.tensor([i % 6, -1]))
    assert len(st.touched) < TOUCHED_FOLD
    assert torch.equal(st.touched_rows(), torch.arange(6))
