"""proper vs peft: imported peft adapters reproduce peft's mixed-adapter batch exactly (fp32), with their own
ranks and alphas; mismatched adapters fail clearly."""
from __future__ import annotations

import copy

import pytest
import torch

import proper
import proper_kernels as pk
from proper_fixtures import LLAMA7, peft_lora_state, smollm2, tiny_llama

PROMPTS = ["The capital of France is", "Hello", "My favourite food is a warm bowl of", "Once upon a time",
           "def add(a, b):", "Rain again today, so", "The best way to learn", "1 2 3 4"]
ROW_USERS = [0, 1, 2, 3, 3, 2, 1, 0]


def _peft_multi(base, ranks, alphas, targets, std=0.05):
    """One peft model holding adapters u0..u{n-1} (non-zero random B) + their exported state dicts/configs."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    pm = None
    for i, (r, a) in enumerate(zip(ranks, alphas)):
        cfg = LoraConfig(r=r, lora_alpha=a, target_modules=list(targets), lora_dropout=0.0)
        if pm is None:
            pm = get_peft_model(base, cfg, adapter_name=f"u{i}")
        else:
            pm.add_adapter(f"u{i}", cfg)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (std if "lora_B" in n else p.shape[-1] ** -0.5))
    states = [get_peft_model_state_dict(pm, adapter_name=f"u{i}") for i in range(len(ranks))]
    return pm.eval(), states, [pm.peft_config[f"u{i}"].to_dict() for i in range(len(ranks))]


def _ours(base, states, configs, user_rank=16, targets=LLAMA7):
    cfg = proper.ProperConfig(num_users=len(states), num_experts=0, user_rank=user_rank, lora_router=False,
                              alpha=32, target_modules=targets, backend="torch")
    model = proper.apply_proper(base, cfg)
    for u, (sd, c) in enumerate(zip(states, configs)):
        proper.import_peft_adapter(model, u, sd, config=c)
    return model.eval()


@pytest.fixture(scope="module")
def smol_setup():
    base, tok = smollm2()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return base, tok, enc


def test_matches_peft_mixed_adapter_batch(smol_setup):
    base, tok, enc = smol_setup
    pm, states, configs = _peft_multi(copy.deepcopy(base), [16] * 4, [32] * 4, LLAMA7)
    ours = _ours(copy.deepcopy(base), states, configs)
    with torch.no_grad():
        ref = pm(**enc, adapter_names=[f"u{u}" for u in ROW_USERS]).logits
        plain = base(**enc).logits
        scale = ref.abs().max().item()
        assert (ref - plain).abs().max().item() > 0.05 * scale      # the adapters really change the logits
        for backend in [b for b in pk.available_backends("cpu") if b in ("cpu", "torch")]:   # auto picks the first
            proper.proper_layers(ours)["model.layers.0.mlp.up_proj"].cfg.backend = backend
            with proper.users(ours, ROW_USERS):
                got = ours(**enc).logits
            assert (got - ref).abs().max().item() <= 1e-4 * scale, (backend, (got - ref).abs().max().item())
    assert not torch.allclose(got[0], got[1])                       # users 0 and 1 differ


def test_heterogeneous_ranks_and_alphas():
    """r=4 (alpha 8) and r=16 (alpha 32) adapters on different module sets share one user table (r_max 16)."""
    base = tiny_llama(layers=2)
    pm, states, configs = _peft_multi(copy.deepcopy(base), [4, 16], [8, 32], ("q_proj", "v_proj", "down_proj"),
                                      std=0.3)
    ours = _ours(copy.deepcopy(base), states, configs, user_rank=16)
    layers = proper.proper_layers(ours)
    q0 = layers["model.layers.0.self_attn.q_proj"]
    assert q0.user_ranks.tolist() == [4, 16]
    assert q0.user_scale.tolist() == [2.0, 2.0]
    assert layers["model.layers.0.mlp.up_proj"].user_ranks.tolist() == [0, 0]   # not in the adapter
    assert q0.user_a[0, 4:].abs().sum() == 0                  # padded rows stay zero
    rows = [0, 1, 1, 0, 0, 1, 0, 1]
    ids = torch.randint(1, 64, (8, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pm(ids, adapter_names=[f"u{u}" for u in rows]).logits
        plain = base(ids).logits
        with proper.users(ours, rows):
            got = ours(ids).logits
    assert (ref - plain).abs().max() > 0.05 * ref.abs().max()
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_import_from_directory_with_rslora(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=6, target_modules=["gate_proj", "v_proj"],
                                                        use_rslora=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    ours = proper.apply_proper(copy.deepcopy(base), proper.ProperConfig(
        num_users=3, user_rank=8, lora_router=False, target_modules=("gate_proj", "up_proj", "v_proj")))
    ranks = proper.import_peft_adapter(ours, 2, tmp_path / "adapter")
    assert ranks["model.layers.0.mlp.gate_proj"] == 4 and ranks["model.layers.0.mlp.up_proj"] == 0
    assert proper.proper_layers(ours)["model.layers.1.self_attn.v_proj"].user_scale[2].item() == pytest.approx(3.0)
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        ref = pm.eval()(ids).logits
        with proper.users(ours.eval(), [2, 2]):
            got = ours(ids).logits
    assert (got - ref).abs().max() < 1e-5


def test_mismatched_adapters_raise_clear_errors():
    base = tiny_llama()
    ours = proper.apply_proper(copy.deepcopy(base), proper.ProperConfig(num_users=2, user_rank=8,
                                                                        target_modules=("gate_proj",)))
    sd, c = peft_lora_state(base, 16, 32, ["gate_proj"], seed=0)
    with pytest.raises(ValueError, match=r"rank 16 > user_rank 8"):
        proper.import_peft_adapter(ours, 0, sd, config=c)
    sd, c = peft_lora_state(base, 4, 8, ["gate_proj", "q_proj"], seed=0)
    with pytest.raises(ValueError, match=r"modules this model does not adapt.*q_proj"):
        proper.import_peft_adapter(ours, 0, sd, config=c)
    sd, c = peft_lora_state(base, 4, 8, ["gate_proj"], seed=0)
    bad = {k: (v[:, :-1] if "lora_A" in k else v) for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"the adapter is 31 -> 48, the model's layer is 32 -> 48"):
        proper.import_peft_adapter(ours, 0, bad, config=c)
    with pytest.raises(ValueError, match=r"'user_id' must be an int in \[0, 2\)"):
        proper.import_peft_adapter(ours, 2, sd, config=c)
    with pytest.raises(ValueError, match="needs config="):
        proper.import_peft_adapter(ours, 0, sd)
    with pytest.raises(ValueError, match="DoRA"):
        proper.import_peft_adapter(ours, 0, sd, config={**c, "use_dora": True})
    only_a = {k: v for k, v in sd.items() if "lora_A" in k}
    with pytest.raises(ValueError, match="not both A and B"):
        proper.import_peft_adapter(ours, 0, only_a, config=c)
    # a failed import leaves the user's slot untouched
    before = proper.proper_layers(ours)["model.layers.0.mlp.gate_proj"].user_a[0].clone()
    with pytest.raises(ValueError):
        dora_key = "base_model.model.model.layers.0.mlp.gate_proj.lora_magnitude_vector"
        proper.import_peft_adapter(ours, 0, {**sd, dora_key: torch.ones(3)}, config=c)
    assert torch.equal(before, proper.proper_layers(ours)["model.layers.0.mlp.gate_proj"].user_a[0])
