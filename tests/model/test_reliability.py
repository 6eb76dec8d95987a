"""The model layer's guarantees (issue: nothing lost, nothing run, nothing leaked): runtime switches never saved,
the LoRA-router switch per thread, train/eval mode kept, bounded caches, one user's fault kept in its rows, and
checked values on load."""
import json
import math
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import proper
from proper import context
from proper.io.checkpoint import WEIGHTS_NAME
from proper_fixtures import patched_llama, tiny_llama

IDS = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(0))


def _logits(m, users):
    with torch.no_grad(), proper.users(m, users):
        return m(IDS[: len(users)]).logits


def test_saving_inside_lora_router_disabled_saves_the_model_outside_it(tmp_path):
    m = patched_llama(router_head=True)
    outside = _logits(m, [0, 3, -1])
    with proper.lora_router_disabled(m):
        off = _logits(m, [0, 3, -1])
        proper.save_pretrained(m, tmp_path / "s")
    assert not torch.allclose(off, outside)                       # the switch does something
    assert json.loads((tmp_path / "s" / "proper_config.json").read_text())["config"]["lora_router"] is True
    m2 = proper.from_pretrained(tiny_llama(), tmp_path / "s")
    proper.set_stage(m2, "user", init_experts=False)
    assert torch.equal(_logits(m2, [0, 3, -1]), outside)


def test_lora_router_switch_is_per_thread():
    m = patched_llama(router_head=True)
    inside, release = threading.Event(), threading.Event()

    def hold():
        with proper.lora_router_disabled(m):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(10)
        w = next(iter(proper.user_routing(m, [0]).values()))[1]
        assert w is not None                                      # this thread still has its LoRA-aware router
    finally:
        release.set()
        t.join()
    with proper.lora_router_disabled(m):
        assert next(iter(proper.user_routing(m, [0]).values()))[1] is None
    assert next(iter(proper.user_routing(m, [0]).values()))[1] is not None


def test_backend_is_a_runtime_switch_never_saved(tmp_path):
    m = patched_llama(backend="torch")
    proper.save_pretrained(m, tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "proper_config.json").read_text())["config"]
    assert "backend" not in saved
    # a model patched with another backend loads the same save
    other = proper.apply_proper(tiny_llama(), proper.ProperConfig(**{**saved, "backend": "auto"}))
    proper.from_pretrained(other, tmp_path / "s")


@pytest.mark.parametrize("training", [False, True])
def test_apply_proper_keeps_the_models_train_flag(training):
    base = tiny_llama().train(training)
    m = proper.apply_proper(base, proper.ProperConfig(num_users=2, dropout=0.5))
    assert all(layer.training is training for layer in proper.proper_layers(m).values())
    if not training:
        proper.set_stage(m, "user")
        assert torch.equal(_logits(m, [0, 1]), _logits(m, [0, 1]))   # no dropout in eval: deterministic


def test_users_context_caches_stay_bounded():
    m = patched_llama(router_head=True)
    n_layers = len(proper.proper_layers(m))
    with torch.no_grad(), proper.users(m, [0, 1]) as batch:
        for length in range(1, 40):                              # generate(use_cache=False) sees every length
            m(torch.ones(2, length, dtype=torch.long))
    assert len(batch._tokens) <= context.SHAPE_ENTRIES
    expansions = sum(len(hit[2]) for hit in batch.cache.values())
    assert expansions <= n_layers * context.SHAPE_ENTRIES


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_one_users_faulty_adapter_stays_in_that_users_rows(bad):
    m = patched_llama(backend="torch", router_head=True)
    layer = proper.proper_layers(m)["model.layers.1.mlp.down_proj"]   # adds straight into the residual stream
    with torch.no_grad():
        layer.user_b[3].fill_(bad)
    out = _logits(m, [1, 3, -1])
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert not torch.isfinite(out[1]).all()


def _rewrite_weights(d, change):
    w = d / WEIGHTS_NAME
    with safe_open(str(w), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(w))
    change(t)
    save_file(t, str(w), metadata=meta)


@pytest.mark.parametrize("key,value,match", [("user_ranks", 999, r"user_ranks.*ranks in \[0, 4\].*999"),
                                             ("user_scale", math.inf, r"user_scale.*finite"),
                                             ("user_ranks", -1, r"user_ranks.*-1")])
def test_bad_per_user_values_in_a_checkpoint_name_the_file(tmp_path, key, value, match):
    d = proper.save_pretrained(patched_llama(), tmp_path / "s")

    def change(t):
        k = next(k for k in t if k.endswith("." + key))
        t[k][2] = value

    _rewrite_weights(d, change)
    with pytest.raises(ValueError, match=match) as e:
        proper.from_pretrained(tiny_llama(), d)
    assert WEIGHTS_NAME in str(e.value)


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(format_version=99), r"format_version 99"),
    (lambda r: r.pop("stage"), r"lacks the keys \['stage'\]"),
    (lambda r: r.update(stage="nonsense"), r"stage 'nonsense'"),
    (lambda r: r["config"].update(user_rank=0), r"invalid 'config'.*user_rank"),
])
def test_bad_checkpoint_records_name_the_file_and_field(tmp_path, edit, match):
    d = proper.save_pretrained(patched_llama(), tmp_path / "s")
    cfile = d / "proper_config.json"
    rec = json.loads(cfile.read_text())
    edit(rec)
    cfile.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=match) as e:
        proper.from_pretrained(tiny_llama(), d)
    assert "proper_config.json" in str(e.value)


def test_an_interrupted_save_loads_as_the_new_save(tmp_path, monkeypatch):
    """A crash after the weights' rename and before the json's leaves new weights beside the old json: the save
    that the weights record is the one that loads (the weights are the commit point)."""
    import proper.io.checkpoint as ck

    old, new = patched_llama(), patched_llama()
    with torch.no_grad():
        for layer in proper.proper_layers(new).values():
            layer.user_b.mul_(3.0)
    d = proper.save_pretrained(old, tmp_path / "s")

    def crash(*a, **k):
        raise KeyboardInterrupt("killed between the two renames")

    monkeypatch.setattr(ck, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        proper.save_pretrained(new, d)
    monkeypatch.undo()
    loaded = proper.from_pretrained(tiny_llama(), d)
    proper.set_stage(loaded, "user", init_experts=False)
    assert torch.equal(_logits(loaded, [0, 3, -1]), _logits(new, [0, 3, -1]))


@pytest.mark.parametrize("field,value", [("lora_alpha", float("nan")), ("lora_alpha", 0), ("lora_alpha", -8),
                                         ("lora_alpha", "16"), ("use_rslora", "yes")])
def test_bad_peft_adapter_config_values_name_the_file_and_field(tmp_path, field, value):
    from proper_fixtures import LLAMA7, peft_lora_state

    base = tiny_llama()
    sd, cfg = peft_lora_state(base, r=2, alpha=4, targets=LLAMA7, seed=0)
    from safetensors.torch import save_file as sf
    d = tmp_path / "adapter"
    d.mkdir()
    sf({k: v.contiguous() for k, v in sd.items()}, str(d / "adapter_model.safetensors"))
    cfg = {k: (list(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg[field] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg, default=str))
    m = proper.apply_proper(tiny_llama(), proper.ProperConfig(num_users=2, target_modules=LLAMA7))
    with pytest.raises(ValueError, match=rf"adapter_config.json.*'{field}'"):
        proper.import_peft_adapter(m, 0, d)
    (d / "adapter_config.json").write_text('{"lora_alpha": 4, "r": ')
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        proper.import_peft_adapter(m, 0, d)


@pytest.mark.parametrize("kw,match", [
    (dict(target_modules="(unclosed"), "not a valid regex"),
    (dict(router_init_std=-1.0), "router_init_std"),
    (dict(router_init_std=float("nan")), "router_init_std"),
    (dict(lora_router="no"), "lora_router"),
    (dict(use_rslora=1), "use_rslora"),
    (dict(dropout="0.1"), "dropout"),
])
def test_config_rejects_wrong_types_and_values(kw, match):
    with pytest.raises(ValueError, match=match):
        proper.ProperConfig(**kw)


def test_generate_for_users_rejects_a_bad_batch_size():
    with pytest.raises(ValueError, match="'batch_size'"):
        proper.generate_for_users(None, None, [(0, "hi")], batch_size=-1)
