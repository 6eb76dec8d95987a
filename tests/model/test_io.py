"""save_pretrained / from_pretrained: bit-exact round trip, atomic writes, clear errors for bad files."""
from __future__ import annotations

import json
import os

import pytest
import torch

import proper
import proper.io.checkpoint as pio
from proper_fixtures import LLAMA7, randomize_b, tiny_llama


def _model(seed=0):
    m = proper.apply_proper(tiny_llama(), proper.ProperConfig(num_users=4, num_experts=3, top_k=2, user_rank=8,
                                                              target_modules=LLAMA7))
    randomize_b(m, std=0.2, seed=seed)
    with torch.no_grad():
        for layer in proper.proper_layers(m).values():
            layer.lora_router.head.weight.normal_()
            layer.user_ranks[1] = 3
            layer.user_scale[1] = 0.5
    proper.set_stage(m, "group", init_experts=False)
    return m


def test_round_trip_is_bit_exact(tmp_path):
    m = _model()
    proper.save_pretrained(m, tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["proper_config.json", "proper_model.safetensors"]
    info = json.loads((tmp_path / "run" / "proper_config.json").read_text())
    assert info["config"]["num_experts"] == 3 and info["stage"] == "group"
    m2 = proper.from_pretrained(tiny_llama(), tmp_path / "run")
    assert proper.get_stage(m2) == "group"
    a, b = proper.proper_state_dict(m), proper.proper_state_dict(m2)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.randint(1, 64, (3, 5))
    proper.set_stage(m, "user")
    proper.set_stage(m2, "user")
    with torch.no_grad(), proper.users(m, [1, 0, -1]), proper.users(m2, [1, 0, -1]):
        assert torch.equal(m(ids).logits, m2(ids).logits)
    # trainable flags follow the saved stage, not whatever the fresh model had
    m3 = proper.from_pretrained(tiny_llama(), tmp_path / "run")
    layer = proper.proper_layers(m3)["model.layers.0.mlp.up_proj"]
    assert layer.expert_a.requires_grad and not layer.user_a.requires_grad


def test_failed_save_leaves_the_old_save_intact(tmp_path, monkeypatch):
    m = _model(seed=0)
    d = proper.save_pretrained(m, tmp_path / "run")
    old = (d / "proper_model.safetensors").read_bytes(), (d / "proper_config.json").read_bytes()
    real = pio.atomic_write

    def half_then_crash(path, write):
        def partial(tmp):
            write(tmp)
            with open(tmp, "r+b") as f:              # a partial file on disk, then the crash
                f.truncate(100)
            raise OSError("disk full")
        real(path, partial)

    monkeypatch.setattr(pio, "atomic_write", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        proper.save_pretrained(_model(seed=1), d)
    assert ((d / "proper_model.safetensors").read_bytes(), (d / "proper_config.json").read_bytes()) == old
    assert sorted(os.listdir(d)) == ["proper_config.json", "proper_model.safetensors"]   # no temp files left
    monkeypatch.undo()
    proper.from_pretrained(tiny_llama(), d)


def test_truncated_foreign_and_mixed_files_fail_clearly(tmp_path):
    from safetensors.torch import save_file

    d = proper.save_pretrained(_model(), tmp_path / "run")
    w = d / "proper_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"not a readable safetensors file \(truncated or corrupt\?\)"):
        proper.from_pretrained(tiny_llama(), d)
    w.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        proper.from_pretrained(tiny_llama(), d)
    save_file({"weight": torch.zeros(3)}, str(w))            # someone else's safetensors
    with pytest.raises(ValueError, match="not a PROPER save"):
        proper.from_pretrained(tiny_llama(), d)
    d2 = proper.save_pretrained(_model(), tmp_path / "other")
    w.write_bytes((d2 / "proper_model.safetensors").read_bytes())   # weights of another save
    with pytest.raises(ValueError, match="come from different saves"):
        proper.from_pretrained(tiny_llama(), d)
    (d / "proper_config.json").write_text('{"format": "proper", "conf')
    with pytest.raises(ValueError, match="not valid JSON"):
        proper.from_pretrained(tiny_llama(), d)
    with pytest.raises(FileNotFoundError, match="proper_model.safetensors"):
        proper.from_pretrained(tiny_llama(), tmp_path / "nothing")


def test_load_into_a_different_architecture_fails_clearly(tmp_path):
    d = proper.save_pretrained(_model(), tmp_path / "run")
    with pytest.raises(ValueError, match="shape"):
        proper.from_pretrained(tiny_llama(layers=2, seed=1).__class__(
            tiny_llama().config.__class__(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)), d)
    with pytest.raises(ValueError, match="missing"):
        proper.from_pretrained(tiny_llama(layers=3), d)
