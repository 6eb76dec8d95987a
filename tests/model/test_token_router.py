"""ProperConfig(token_router=True): a per-token term on the group-gate logits (issue 15's optional router input)."""
from __future__ import annotations

import pytest
import torch

import proper
from proper.modules.routers import top_k_gates
from proper_fixtures import LLAMA7, randomize_b, tiny_llama
from proper_kernels import routed_lora_reference

IDS = [0, 2, -1, 3]


def _model(token_router, stage="group"):
    m = proper.apply_proper(tiny_llama(), proper.ProperConfig(num_users=4, num_experts=3, top_k=2, expert_rank=4,
                                                              user_rank=4, target_modules=LLAMA7,
                                                              token_router=token_router))
    proper.set_stage(m, stage)
    randomize_b(m, std=0.2)
    return m


def _perturb(m, std=0.5):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in proper.proper_layers(m).values():
            layer.token_router.copy_(torch.randn(layer.token_router.shape, generator=g) * std)


@pytest.mark.parametrize("stage", ["group", "user"])
def test_zero_token_term_is_per_user_routing(stage):
    x = torch.randint(1, 64, (4, 6))
    with torch.no_grad():
        outs = []
        for flag in (False, True):
            m = _model(flag, stage)
            with proper.users(m, IDS):
                outs.append(m(x).logits)
    assert torch.equal(outs[0], outs[1])


def test_gates_follow_the_tokens_and_match_the_formula():
    m = _model(True)
    _perturb(m)
    name = "model.layers.1.mlp.gate_proj"
    layer = proper.proper_layers(m)[name]
    xs = {}
    layer.register_forward_hook(lambda mod, inp, out: xs.update(x=inp[0].detach(), y=out.detach()))
    with torch.no_grad(), proper.users(m, IDS):
        m(torch.randint(1, 64, (4, 6)))
    x = xs["x"].reshape(-1, layer.in_features)                                     # [24, d_in]
    ids = torch.tensor(IDS).repeat_interleave(6)
    r = layer.user_router
    logits = r.logits(ids) + x @ layer.token_router.t()
    probs = torch.softmax(logits, -1)
    probs = torch.where((ids < 0)[:, None], r.population_probs()[None], probs)   # cold start as per-user routing
    gates = top_k_gates(probs, 2)
    assert not torch.equal(gates[0], gates[1])                                     # two tokens of one user differ
    want = torch.nn.functional.linear(x, layer.weight, layer.bias) + routed_lora_reference(
        x, layer.expert_a, layer.expert_b, gates, None, None, None, expert_scale=proper.get_state(m).cfg.expert_scale)
    # fp32 rounding only: the model applies the router head once per user, this check once per token
    torch.testing.assert_close(xs["y"].reshape(-1, layer.out_features), want, rtol=1e-5, atol=1e-5)


def test_token_term_trains_with_the_router_and_saves(tmp_path):
    m = _model(True)
    _perturb(m)
    layer = next(iter(proper.proper_layers(m).values()))
    assert layer.token_router.requires_grad                                        # group stage: the router trains
    x = torch.randint(1, 64, (4, 6))
    with proper.users(m, IDS):
        m(x).logits.pow(2).mean().backward()
    assert layer.token_router.grad is not None and layer.token_router.grad.abs().sum() > 0
    proper.set_stage(m, "user")
    assert not layer.token_router.requires_grad                                    # frozen with the router
    proper.save_pretrained(m, tmp_path / "s")
    again = proper.from_pretrained(tiny_llama(), tmp_path / "s")
    with torch.no_grad():
        with proper.users(m, IDS):
            a = m(x).logits
        with proper.users(again, IDS):
            b = again(x).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="token_router is set"):
        proper.export_peft_adapter(m, 0, tmp_path / "peft")


def test_token_router_needs_experts():
    with pytest.raises(ValueError, match="'token_router' needs num_experts > 0"):
        proper.ProperConfig(token_router=True)
