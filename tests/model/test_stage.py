"""set_stage: what runs and what trains in each stage; the routers' gates (top-k, cold start, LoRA-aware)."""
from __future__ import annotations

import pytest
import torch

import proper
from proper_fixtures import LLAMA7, randomize_b, tiny_llama


def _model(**kw):
    cfg = dict(num_users=5, num_experts=3, top_k=2, user_rank=4, expert_rank=4)
    cfg.update(kw)
    return proper.apply_proper(tiny_llama(), proper.ProperConfig(**cfg))


def _trainable_suffixes(m):
    return {n.split(".", 5)[-1] for n, p in m.named_parameters() if p.requires_grad}


def test_requires_grad_per_stage():
    m = _model()
    proper.set_stage(m, "population")
    assert _trainable_suffixes(m) == {"population_a", "population_b"}
    proper.set_stage(m, "group")
    assert _trainable_suffixes(m) == {"expert_a", "expert_b", "router.embedding.weight", "router.proj.weight",
                                      "router.proj.bias"}
    proper.set_stage(m, "user")
    assert _trainable_suffixes(m) == {"user_a", "user_b", "lora_router.probes", "lora_router.head.weight",
                                      "lora_router.head.bias"}
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.endswith(("weight", "bias"))
                   and "router" not in n)
    assert len(proper.trainable_parameters(m)) == 6 * 5
    with pytest.raises(ValueError, match="'stage' must be one of"):
        proper.set_stage(m, "users")
    with pytest.raises(ValueError, match="num_experts=0"):
        proper.set_stage(_model(num_experts=0), "group")
    with pytest.raises(ValueError, match="population_rank=0"):
        proper.set_stage(_model(num_experts=0), "population")


def test_what_runs_in_each_stage():
    m = _model()
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        proper.set_stage(m, "population")
        base = m(ids).logits                          # all B are zero: base model
        randomize_b(m, std=0.3)
        pop = m(ids).logits                           # population LoRA, no users needed
        assert not torch.allclose(pop, base, atol=1e-4)
        assert torch.allclose(pop[0], m(ids[:1]).logits[0], atol=1e-5)   # the same LoRA for every row
        proper.set_stage(m, "group")                  # first group stage: experts = copies of the population
        with proper.users(m, [0, 3]):
            torch.testing.assert_close(m(ids).logits, pop, rtol=1e-4, atol=1e-4)
        for layer in proper.proper_layers(m).values():
            layer.expert_b.normal_(0, 0.3)
            layer.user_b.zero_()
        proper.set_stage(m, "population")
        proper.set_stage(m, "group")                  # not copied again: the experts keep their training
        with proper.users(m, [0, 3]):
            group = m(ids).logits
        assert not torch.allclose(group, pop, atol=1e-4)
        proper.set_stage(m, "user")                   # user B = 0 and w = 1 at start: same as the group stage
        with proper.users(m, [0, 3]):
            torch.testing.assert_close(m(ids).logits, group)
        randomize_b(m, std=0.3, seed=5)
        with proper.users(m, [0, 3]):
            assert not torch.allclose(m(ids).logits, group, atol=1e-4)


def test_user_aware_router_top_k_and_cold_start():
    r = proper.UserAwareRouter(num_users=6, num_experts=4, dim=8, top_k=2)
    ids = torch.tensor([0, 5, -1, -1])
    g = r(ids)
    assert g.shape == (4, 4) and ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(4))
    pop = torch.softmax(r.proj(r.embedding.weight), -1).mean(0)
    torch.testing.assert_close(g[2], proper.top_k_gates(pop[None], 2)[0])
    assert torch.equal(g[2], g[3]) and not torch.equal(g[0], g[1])            # distinct users start distinct
    dense = proper.UserAwareRouter(num_users=6, num_experts=4, dim=8, top_k=0)(ids)
    assert (dense > 0).all()


def test_lora_aware_router_starts_neutral_and_reads_the_users_lora():
    r = proper.LoRAAwareRouter(d_in=16, d_out=12, num_experts=3, num_probes=2)
    a, b = torch.randn(2, 4, 16), torch.randn(2, 12, 4)
    delta, w = r(a, b, torch.tensor([4, 2]), torch.tensor([1.0, 2.0]))
    assert torch.equal(delta, torch.zeros(2, 3)) and torch.equal(w, torch.ones(2))    # zero-initialised head
    f = r.features(a, b, torch.tensor([4, 2]), torch.tensor([1.0, 2.0]))
    a2 = a.clone()
    a2[1, 2:] = float("nan")                                   # padded rank rows are never read
    assert torch.equal(f, r.features(a2, b, torch.tensor([4, 2]), torch.tensor([1.0, 2.0])))
    want = (2.0 * b[1, :, :2] @ (a[1, :2] @ r.probes.t())).flatten()
    torch.testing.assert_close(f[1], want)
    with torch.no_grad():
        r.head.weight.normal_(0, 0.05)
    delta, w = r(a, b, torch.tensor([4, 2]), torch.tensor([1.0, 2.0]))
    assert not torch.equal(delta[0], delta[1]) and w[0] != w[1] and ((w > 0) & (w < 2)).all()


def test_no_experts_no_lora_router_is_plain_multi_user_lora():
    m = _model(num_experts=0, lora_router=False, target_modules=LLAMA7)
    layer = proper.proper_layers(m)["model.layers.0.self_attn.q_proj"]
    assert not hasattr(layer, "router") and not hasattr(layer, "lora_router") and layer.pop_rank == 0
    randomize_b(m, std=0.3)
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad(), proper.users(m, [-1, -1]):
        assert torch.equal(m(ids).logits, tiny_llama()(ids).logits)       # no user, nothing else: the base model


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4, 3], [2, 0, 1]],
                         ids=["every-user", "every-user-one-twice", "some-users"])
@pytest.mark.parametrize("ranks", ["full", "mixed"])
def test_lora_router_over_the_whole_table_matches_the_gather(ids, ranks, monkeypatch):
    """A batch holding every user table row routes the whole table (UserBatch.covers_table) and picks rows; the
    loss and every gradient equal the gathering path's (up to summation order: a user twice in the batch sums its
    two rows' gradients before, not after, the router's backward)."""
    from proper.context import UserBatch
    from proper_fixtures import patched_llama

    m = patched_llama("user", router_head=True)
    if ranks == "mixed":
        for layer in proper.proper_layers(m).values():
            layer.user_ranks.copy_(torch.tensor([4, 1, 3, 0, 2, 4]))
    x = torch.randint(0, 16, (len(ids), 5), generator=torch.Generator().manual_seed(3))

    def step():
        m.zero_grad(set_to_none=True)
        with proper.users(m, ids):
            loss = m(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    seen = []
    real = UserBatch.covers_table
    monkeypatch.setattr(UserBatch, "covers_table", property(lambda b: seen.append(real.fget(b)) or seen[-1]))
    loss, grads = step()
    assert any(seen) == (len(set(ids)) == 6)
    monkeypatch.setattr(UserBatch, "covers_table", property(lambda b: False))
    loss_g, grads_g = step()
    torch.testing.assert_close(loss, loss_g)
    assert grads.keys() == grads_g.keys() and any("lora_router" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_g[n], msg=n)


def test_lora_aware_router_probe_response_matches_the_formula_forward_and_backward():
    """The router's hand-ordered products (_ProbeResponse) against plain autograd on the docstring's formula,
    in float64 (every gradient: a, b, probes, head), heterogeneous ranks included; and torch's gradcheck."""
    from proper.modules.routers import _ProbeResponse

    torch.manual_seed(0)
    r = proper.LoRAAwareRouter(d_in=10, d_out=7, num_experts=3, num_probes=2).double()
    with torch.no_grad():
        r.head.weight.normal_(0, 0.5)
        r.head.bias.normal_(0, 0.5)
    a = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    ranks, scale = torch.tensor([4, 2, 3]), torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)

    def formula():
        keep = torch.arange(4)[None, :] < ranks[:, None]
        am, bm = torch.where(keep[:, :, None], a, 0.0), torch.where(keep[:, None, :], b, 0.0)
        f = (torch.matmul(bm, torch.matmul(am, r.probes.t())) * scale[:, None, None]).flatten(1)
        out = r.head(f)
        return out[:, :-1], 2.0 * torch.sigmoid(out[:, -1]), f

    leaves = [a, b, r.probes, r.head.weight, r.head.bias]
    dw, ww, fw = formula()
    gw = torch.autograd.grad((dw.sin().sum() + ww.cos().sum()), leaves)
    d, w = r(a, b, ranks, scale)
    g = torch.autograd.grad((d.sin().sum() + w.cos().sum()), leaves)
    torch.testing.assert_close(r.features(a, b, ranks, scale), fw)
    torch.testing.assert_close(d, dw)
    torch.testing.assert_close(w, ww)
    for got, want in zip(g, gw):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(_ProbeResponse.apply, (a, b, r.probes.detach().requires_grad_()))
    # the benchmark's ablation (bench_train_step --ablations: ours-router-autograd) computes the same products
    from proper.bench.train_step import AutogradProbeResponse
    torch.testing.assert_close(AutogradProbeResponse.apply(a, b, r.probes), _ProbeResponse.apply(a, b, r.probes))
