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
