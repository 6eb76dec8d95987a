"""apply_proper on Llama, GPT-2 (Conv1D) and BERT; target errors; one routed_lora call per layer; the layer's
maths against routed_lora_reference with hand-computed routing."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import proper
import proper.modules.linear as L
from proper_fixtures import LLAMA7, randomize_b, tiny_bert, tiny_gpt2, tiny_llama
from proper_kernels import routed_lora_reference


def test_swaps_only_named_linears_of_this_instance():
    m, other = tiny_llama(), tiny_llama()
    ids = torch.randint(1, 64, (3, 5))
    with torch.no_grad():
        base = m(ids).logits
    proper.apply_proper(m, proper.ProperConfig(num_users=4, num_experts=2, top_k=1))
    names = list(proper.proper_layers(m))
    assert len(names) == 6 and all(n.rsplit(".", 1)[-1] in proper.FFN_TARGETS for n in names)
    assert isinstance(m.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(other.model.layers[0].mlp.gate_proj, nn.Linear)          # no class patched
    assert type(other.model.layers[0].mlp).forward is type(m.model.layers[0].mlp).forward
    # the base weights are the same Parameters, frozen, with unchanged state-dict keys
    assert m.model.layers[0].mlp.gate_proj.weight is m.get_parameter("model.layers.0.mlp.gate_proj.weight")
    assert not m.model.layers[0].mlp.gate_proj.weight.requires_grad
    with torch.no_grad(), proper.users(m, [0, 3, -1]):
        assert torch.equal(m(ids).logits, base)                                 # every B starts at zero
    with pytest.raises(ValueError, match="already has PROPER layers"):
        proper.apply_proper(m, proper.ProperConfig())


def test_unknown_targets_list_the_linear_modules():
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear module of LlamaForCausalLM.*"
                                         r"q_proj \(2\), k_proj \(2\).*lm_head \(1\)"):
        proper.apply_proper(tiny_llama(), proper.ProperConfig(target_modules=("q_proj", "qproj")))
    with pytest.raises(ValueError, match=r"these match but are not linear: \['model.layers.0.mlp'"):
        proper.apply_proper(tiny_llama(), proper.ProperConfig(target_modules=("mlp",)))
    m = proper.apply_proper(tiny_llama(), proper.ProperConfig(target_modules=r".*layers\.1\..*_proj"))
    assert len(proper.proper_layers(m)) == 7 and all(".1." in n for n in proper.proper_layers(m))


def test_one_routed_lora_call_per_layer_forward(monkeypatch):
    m = proper.apply_proper(tiny_llama(), proper.ProperConfig(num_users=4, num_experts=3, top_k=2,
                                                              target_modules=LLAMA7))
    calls, prepared = [], []
    real, real_call = L.routed_lora, L.PreparedRoutedLoRA.__call__
    monkeypatch.setattr(L, "routed_lora", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(L.PreparedRoutedLoRA, "__call__",
                        lambda self, x, out=None: prepared.append(x.shape) or real_call(self, x, out=out))
    ids = torch.randint(1, 64, (4, 5))
    with proper.users(m, [0, 1, 2, 3]):   # training: the op itself, once per layer, on the [20, d_in] tokens
        m(ids)
    assert len(calls) == 14 and all(s == (20, s[1]) for s in calls) and not prepared
    calls.clear()
    with torch.no_grad(), proper.users(m, [0, 1, 2, 3]):   # inference: one prepared call per layer per forward
        m(ids)
        m(ids)
    assert not calls and len(prepared) == 28 and all(s[:2] == (4, 5) for s in prepared)


def test_prepared_forward_follows_the_input_shape():
    """[B, 1, d] and [B, d] inputs of the same tokens in one users() block: each its own prepared call, the same
    values, and the same bits as the general (gradient) path."""
    m = proper.apply_proper(tiny_llama(), proper.ProperConfig(num_users=4, num_experts=3, top_k=2,
                                                              target_modules=LLAMA7))
    proper.set_stage(m, "user")
    randomize_b(m)
    layer = proper.proper_layers(m)["model.layers.0.mlp.up_proj"]
    x = torch.randn(4, 1, layer.in_features)
    with proper.users(m, [0, 1, 2, -1]):
        with torch.no_grad():
            y3, y2 = layer(x), layer(x[:, 0])
        general = layer(x).detach()
    assert y3.shape == (4, 1, layer.out_features) and y2.shape == (4, layer.out_features)
    assert torch.equal(y3[:, 0], y2) and torch.equal(y3, general)
    assert not torch.equal(y3, torch.nn.functional.linear(x, layer.weight, layer.bias))   # the adapters count


def _manual_routing(layer, ids, stage):
    """Gates and w computed by hand from the routers' parameters (per user), for comparison."""
    u = ids.clamp(min=0)
    r = layer.router
    logits = r.proj(r.embedding(u))
    w = None
    if stage == "user":
        a, b = layer.user_a[u], layer.user_b[u]
        a = a * (torch.arange(a.shape[1]) < layer.user_ranks[u][:, None])[..., None]   # rows past the rank
        h = torch.einsum("brd,pd->brp", a, layer.lora_router.probes)
        f = (torch.einsum("bor,brp->bop", b, h) * layer.user_scale[u][:, None, None]).flatten(1)
        out = layer.lora_router.head(f)
        logits = logits + out[:, :-1]
        w = 2 * torch.sigmoid(out[:, -1])
    p = torch.softmax(logits, -1)
    pop = torch.softmax(r.proj(r.embedding.weight), -1).mean(0)
    p = torch.where((ids < 0)[:, None], pop, p)
    top = p.topk(2, -1)
    g = torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    return g, w


@pytest.mark.parametrize("stage", ["group", "user"])
def test_layer_maths_matches_reference(stage):
    torch.manual_seed(0)
    m = proper.apply_proper(tiny_llama(), proper.ProperConfig(num_users=5, num_experts=4, top_k=2, user_rank=4,
                                                              target_modules=("up_proj",)))
    randomize_b(m, std=0.3)
    layer = proper.proper_layers(m)["model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        layer.lora_router.head.weight.normal_(0, 0.5)
        layer.lora_router.head.bias.normal_(0, 0.5)
        layer.user_ranks[2] = 2
    proper.set_stage(m, stage, init_experts=False)
    ids = torch.tensor([3, -1, 2])
    x = torch.randn(3, 6, 32)
    with torch.no_grad(), proper.users(m, ids):
        got = layer(x)
    g, w = _manual_routing(layer, ids, stage)
    T = 18
    tok = ids.repeat_interleave(6)
    kw = dict(expert_scale=16 / 8)
    args = [x.reshape(T, 32), layer.expert_a, layer.expert_b, g.repeat_interleave(6, 0), None, None, None]
    if stage == "user":
        args[4:] = [layer.user_a, layer.user_b, tok]
        kw.update(user_ranks=layer.user_ranks, user_scale=layer.user_scale, user_weight=w.repeat_interleave(6))
    with torch.no_grad():
        want = x @ layer.weight.t() + routed_lora_reference(*args, **kw).view(3, 6, -1)
        assert (g > 0).sum(-1).tolist() == [2, 2, 2]
        assert w is None or not torch.allclose(w, torch.ones_like(w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d():
    m = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        base = m(ids).logits
    proper.apply_proper(m, proper.ProperConfig(num_users=3, num_experts=2, user_rank=4,
                                               target_modules=("c_attn", "c_fc", "c_proj")))
    layers = proper.proper_layers(m)
    assert len(layers) == 8 and all(layer.conv1d for layer in layers.values())
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    with torch.no_grad(), proper.users(m, [1, 2]):
        assert torch.allclose(m(ids).logits, base, atol=1e-6)
    randomize_b(m, std=0.2)
    proper.set_stage(m, "user")
    x = torch.randn(2, 7, 32)
    with torch.no_grad(), proper.users(m, [1, -1]):
        got = c_attn(x)
        want = x @ c_attn.weight + c_attn.bias                    # Conv1D stores W as [d_in, d_out]
        assert not torch.allclose(got, want, atol=1e-3)
    # train through Conv1D: the base weight stays frozen, user 1's adapter learns
    m.train()
    with proper.users(m, [1, 1]):
        m(ids, labels=ids).loss.backward()
    assert c_attn.weight.grad is None and c_attn.user_b.grad[1].abs().sum() > 0
    assert c_attn.user_b.grad[[0, 2]].abs().sum() == 0


def test_bert_rows_without_user_are_the_base_model():
    m = tiny_bert()
    ids = torch.randint(0, 64, (3, 6))
    with torch.no_grad():
        base = m(ids).last_hidden_state
    proper.apply_proper(m, proper.ProperConfig(num_users=2, num_experts=0, lora_router=False,
                                               target_modules=("query", "value", "intermediate.dense")))
    assert len(proper.proper_layers(m)) == 6
    randomize_b(m, std=0.2)
    with torch.no_grad(), proper.users(m, [0, -1, 1]):
        out = m(ids).last_hidden_state
    assert torch.allclose(out[1], base[1], atol=1e-6)
    assert not torch.allclose(out[0], base[0], atol=1e-3) and not torch.allclose(out[2], base[2], atol=1e-3)
