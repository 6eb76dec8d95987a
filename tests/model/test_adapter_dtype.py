"""ProperConfig(adapter_dtype="bfloat16"): bf16 adapter weights on an fp32 model (issue 17's serving option)."""
from __future__ import annotations

import pytest
import torch

import proper
from proper_kernels import available_backends
from proper_fixtures import LLAMA7, randomize_b, tiny_llama

IDS = [0, 2, -1, 3]
BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]


def _cfg(**kw):
    return proper.ProperConfig(num_users=4, num_experts=3, top_k=2, expert_rank=4, user_rank=4,
                               target_modules=LLAMA7, **kw)


def _pair(tmp_path, backend="auto"):
    """(an fp32 model in the user stage, the same save loaded with bf16 adapters)."""
    m = proper.apply_proper(tiny_llama(), _cfg(backend=backend))
    proper.set_stage(m, "user")
    randomize_b(m, std=0.2)
    proper.save_pretrained(m, tmp_path / "s")
    b = proper.from_pretrained(tiny_llama(), tmp_path / "s", adapter_dtype="bfloat16", backend=backend)
    return m, b


def test_bf16_adapters_are_the_fp32_weights_rounded_once(tmp_path):
    m, b = _pair(tmp_path)
    for name, layer in proper.proper_layers(b).items():
        ref = proper.proper_layers(m)[name]
        assert layer.adapter_dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
        for part in ("experts", "users", "population"):
            for k, t in layer.part_tensors(part).items():
                if t.is_floating_point() and k not in ("user_scale",):
                    assert t.dtype == torch.bfloat16, k
                    assert torch.equal(t, ref.part_tensors(part)[k].to(torch.bfloat16)), k
        for k, t in layer.part_tensors("lora_router").items():   # routers keep the base dtype
            assert t.dtype == torch.float32, k
    # a runtime switch: never saved, so the bf16 model saves a checkpoint that loads as fp32 again
    proper.save_pretrained(b, tmp_path / "b")
    again = proper.from_pretrained(tiny_llama(), tmp_path / "b")
    assert next(iter(proper.proper_layers(again).values())).adapter_dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_adapters_serve_like_fp32_within_bf16_rounding(tmp_path, backend):
    m, b = _pair(tmp_path, backend)
    x = torch.randint(1, 64, (4, 6))
    with torch.no_grad():
        base = tiny_llama()(x).logits
        with proper.users(m, IDS):
            ref = m(x).logits
        with proper.users(b, IDS):
            fast = b(x).logits          # no grad: the prepared path (the cpu kernel adds the fp32 delta)
            fast2 = b(x).logits         # a second step reuses the prepared calls
    with proper.users(b, IDS):
        slow = b(x).logits.detach()     # grad on: the general path (the op in bf16, its delta added)
    effect = (ref - base).abs().max()
    assert effect > 0.05                # the adapters change the output, so the comparison can fail
    # bf16 keeps 8 mantissa bits: the input and the weights of every delta are rounded by <= 2^-9 relative, so
    # the adapters' effect carries about 1% error after a few layers; 5% of it bounds that with margin, and a
    # wrong dtype path (a delta dropped, scaled twice or computed from garbage) is off by 100% of the effect
    for got in (fast, slow):
        err = (got - ref).abs().max()
        assert 0 < err < 0.05 * effect, (float(err), float(effect))
    assert torch.equal(fast, fast2)


def test_bf16_adapters_train(tmp_path):
    m, b = _pair(tmp_path)
    x = torch.randint(1, 64, (4, 6))
    with proper.users(b, IDS):
        loss = b(x).logits.float().pow(2).mean()
    loss.backward()
    layer = next(iter(proper.proper_layers(b).values()))
    g = layer.user_b.grad
    assert g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    assert g[[0, 2, 3]].abs().sum() > 0 and g[1].abs().sum() == 0   # only the batch's users


def test_bad_adapter_dtype_is_named():
    with pytest.raises(ValueError, match="'adapter_dtype' must be None"):
        proper.ProperConfig(adapter_dtype="float16")
