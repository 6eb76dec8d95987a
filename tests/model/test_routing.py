"""Public routing API (lora_router_disabled, user_routing, user_gates) and gradient checkpointing with users."""
from __future__ import annotations

import pytest
import torch

import proper
from proper_fixtures import patched_llama


def _patched(stage="user", **kw):
    return patched_llama(stage, router_head=True, **{"num_users": 5, **kw})


def test_user_gates_and_router_switch():
    m = _patched()
    g = proper.user_gates(m, [0, 3, -1])
    L = len(proper.proper_layers(m))
    assert g.shape == (L, 3, 3) and torch.allclose(g.sum(-1), torch.ones(L, 3))
    assert ((g > 0).sum(-1) == 2).all()                                   # top-2
    routes = proper.user_routing(m, [0, 3])
    assert all(w is not None and w.shape == (2,) for _, w in routes.values())
    ids = torch.randint(1, 64, (2, 5))
    with proper.users(m, [0, 3]):
        on = m(ids).logits
        with proper.lora_router_disabled(m):
            assert all(w is None for _, w in proper.user_routing(m, [0, 3]).values())
            off = m(ids).logits
        again = m(ids).logits
    assert (on - off).abs().max() > 1e-4 and torch.equal(on, again)
    with pytest.raises(RuntimeError):
        with proper.lora_router_disabled(m):
            raise RuntimeError("boom")
    assert proper.get_stage(m) == "user" and proper.user_routing(m, [1])[next(iter(routes))][1] is not None
    assert proper.user_gates(_patched(num_experts=0), [0]) is None
    with pytest.raises(ValueError, match="user_ids"):
        proper.user_gates(m, [7])


@pytest.mark.parametrize("stage", ["group", "user"])
def test_gradient_checkpointing_recomputes_with_each_batch_users(stage):
    ref, ck = _patched(stage).train(), _patched(stage).train()
    ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs=proper.gradient_checkpointing_kwargs())
    a, b = torch.randint(1, 64, (2, 6)), torch.randint(1, 64, (3, 6))
    for m in (ref, ck):   # gradient accumulation over two batches of different users, one backward
        with proper.users(m, [0, 4]):
            la = m(a, labels=a).loss
        with proper.users(m, [1, 2, 1]):
            lb = m(b, labels=b).loss
        (la + lb).backward()
    gr = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    gc = {n: p.grad for n, p in ck.named_parameters() if p.grad is not None}
    assert gr.keys() == gc.keys() and gr
    for n in gr:
        torch.testing.assert_close(gc[n], gr[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gradient_checkpointing_without_the_kwargs_names_the_fix():
    m = _patched().train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(1, 64, (2, 6))
    with proper.users(m, [0, 1]):
        loss = m(ids, labels=ids).loss
    with pytest.raises(proper.MissingUsersError, match="gradient_checkpointing_kwargs"):
        loss.backward()


# ------------------------------------------------------------------------------------------- router_scope
def _group_model(scope, **kw):
    from proper_fixtures import tiny_llama

    m = tiny_llama()
    proper.apply_proper(m, proper.ProperConfig(**{"num_users": 6, "num_experts": 3, "expert_rank": 4,
                                                  "user_rank": 2, "top_k": 2, "router_scope": scope, **kw}))
    proper.set_stage(m, "group")
    with torch.no_grad():   # non-zero experts, so the gates change the output
        for layer in proper.proper_layers(m).values():
            layer.expert_b.normal_(0, 0.1)
    return m


def _router_keys(m):
    return sorted(k for k in m.state_dict() if ".router." in k and "lora_router" not in k)


@pytest.mark.parametrize("paged", [None, 3])
def test_model_router_is_one_assignment_shared_by_every_layer(paged):
    m = _group_model("model", resident_users=paged)
    layers = proper.proper_layers(m)
    first = next(iter(layers))
    # one table and one head, held by the first adapted layer; the other layers route with it
    assert all(k.startswith(first + ".router.") for k in _router_keys(m))
    assert all(layer.user_router is layers[first].router for layer in layers.values())
    g = proper.user_gates(m, [0, 1, 2, -1])
    assert torch.equal(g, g[:1].expand_as(g)) and not torch.equal(g[0, 0], g[0, 1])
    # the router trains through every layer's use of it, and gradients reach only the batch's rows
    ids = torch.randint(1, 60, (2, 5))
    with proper.users(m, [0, 4]):
        m(ids).logits.square().mean().backward()
    emb = layers[first].router.embedding.weight
    rows = proper.get_state(m).user_rows([0, 4])
    assert emb.grad[rows].abs().sum() > 0 and emb.grad.abs().sum() == emb.grad[rows].abs().sum()
    assert layers[first].router.proj.weight.grad.abs().sum() > 0


def test_router_scopes_state_dicts_and_legacy_configs(tmp_path):
    from proper_fixtures import tiny_llama

    keys = {s: _router_keys(_group_model(s)) for s in ("model", "heads", "layer")}
    L = len(proper.proper_layers(_group_model("layer")))
    assert len(keys["model"]) == 3                       # embedding, proj weight and bias
    assert len(keys["heads"]) == 1 + 2 * L               # one embedding, a head per layer
    assert len(keys["layer"]) == 3 * L
    g = proper.user_gates(_group_model("heads"), [0, 1])
    assert not torch.equal(g[0], g[-1])                  # heads differ per layer
    # a config saved before router_scope existed meant one router per layer
    assert proper.ProperConfig.from_dict({"num_users": 2}).router_scope == "layer"
    assert proper.ProperConfig().router_scope == "model"
    with pytest.raises(ValueError, match="router_scope"):
        proper.ProperConfig(router_scope="token")
    for scope in ("model", "heads"):   # save -> load gives the same outputs, dense and paged
        for paged in (None, 3):
            m = _group_model(scope, resident_users=paged)
            ids = torch.randint(1, 60, (3, 5))
            proper.save_pretrained(m, tmp_path / f"{scope}{paged}")
            m2 = proper.from_pretrained(tiny_llama(), tmp_path / f"{scope}{paged}")
            assert m2._proper_state.cfg.router_scope == scope
            with torch.no_grad(), proper.users(m, [0, 1, 5]):
                a = m(ids).logits
            with torch.no_grad(), proper.users(m2, [0, 1, 5]):
                b = m2(ids).logits
            assert torch.equal(a, b)


@pytest.mark.parametrize("paged", [None, 3])
def test_reset_user_adapters_serves_those_users_by_the_groups(paged):
    m = _group_model("model", resident_users=paged, lora_router=True)
    ids = torch.randint(1, 60, (3, 5))
    with torch.no_grad(), proper.users(m, [0, 1, 2]):
        group = m(ids).logits
    proper.set_stage(m, "user")
    with torch.no_grad():   # give users 0..2 non-zero LoRAs (B), through the slots when paged
        for u in (0, 1, 2):
            row = proper.get_state(m).user_row(u, write=True)
            for layer in proper.proper_layers(m).values():
                layer.user_b[row].normal_(0, 0.3)
    with torch.no_grad(), proper.users(m, [0, 1, 2]):
        before = m(ids).logits
    proper.reset_user_adapters(m, [0, 2])
    with torch.no_grad(), proper.users(m, [0, 1, 2]):
        after = m(ids).logits
    # the LoRA-aware router's head is zero here, so a reset user is exactly the group model
    assert torch.equal(after[0], group[0]) and torch.equal(after[2], group[2])
    assert torch.equal(after[1], before[1]) and not torch.equal(before[1], group[1])
    with pytest.raises(ValueError, match="user_ids"):
        proper.reset_user_adapters(m, [9])


@pytest.mark.parametrize("scope,paged", [("model", None), ("model", 3), ("heads", None), ("layer", None)])
def test_set_router_logits_gives_those_gates_in_every_layer(scope, paged):
    m = _group_model(scope, resident_users=paged)
    U = proper.get_state(m).cfg.num_users
    K = proper.get_state(m).cfg.num_experts
    logits = torch.randn(U, K) * 2
    proper.set_router_logits(m, range(U), logits)
    g = proper.user_gates(m, list(range(U)))
    want = proper.top_k_gates(torch.softmax(logits, -1), proper.get_state(m).cfg.effective_top_k)
    assert torch.allclose(g, want[None].expand_as(g), atol=1e-6)
    with pytest.raises(ValueError, match="'logits' must have shape"):
        proper.set_router_logits(m, [0, 1], logits)
    with pytest.raises(ValueError, match="user_ids"):
        proper.set_router_logits(m, [U], logits[:1])
    with pytest.raises(ValueError, match="finite"):
        proper.set_router_logits(m, [0], torch.full((1, K), float("nan")))
