"""export_peft_adapter / export_users / `proper export`: one PROPER user as one standard peft LoRA, exactly.

The model has every part non-zero: K = 4 experts (top-2, distinct), the LoRA-aware router with a random head,
random user LoRAs, and two users imported from peft at lower ranks (one on a subset of the modules). peft
loading the exported folders must give proper's logits, one user at a time and as a mixed batch.
"""
from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import proper
import proper.io.peft
from proper.cli.export import add_export_arguments, run_export_args
from proper_fixtures import LLAMA7, peft_lora_state, tiny_llama

U, K, TOP_K, R_E, R_U = 6, 4, 2, 4, 8
IMPORTED = {4: (4, 8, LLAMA7), 5: (2, 6, ("q_proj", "v_proj", "down_proj"))}   # user: (rank, alpha, targets)
# fp32 on both sides, different summation orders (proper: one wide shrink, gates in rank space; peft: one LoRA
# per module with the scales folded into B'): the logits agree to fp32 rounding, ~1e-6 of their magnitude
TOL = 1e-5


@torch.no_grad()
def _randomize(model, seed=0):
    """Every PROPER parameter random (experts distinct, router and LoRA-aware router head non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for layer in proper.proper_layers(model).values():
        for name, p in layer.named_parameters():
            if name in ("weight", "bias"):
                continue
            std = 0.2 if name.endswith("_b") else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def setup():
    base = tiny_llama()
    cfg = proper.ProperConfig(num_users=U, num_experts=K, top_k=TOP_K, expert_rank=R_E, user_rank=R_U,
                              lora_router=True, target_modules=LLAMA7)
    model = proper.apply_proper(copy.deepcopy(base), cfg)
    _randomize(model)
    for u, (r, alpha, targets) in IMPORTED.items():
        sd, c = peft_lora_state(base, r, alpha, targets, seed=10 + u, std=0.2)
        proper.import_peft_adapter(model, u, sd, config=c)
    with torch.no_grad():   # rows past a user's rank are never read: NaN there must not reach the export
        for layer in proper.proper_layers(model).values():
            layer.user_a[5, int(layer.user_ranks[5]):] = float("nan")
    proper.set_stage(model, "user", init_experts=False)
    ids = torch.randint(1, 64, (8, 7), generator=torch.Generator().manual_seed(0))
    return base, model.eval(), ids


def _user_rank(model, u, name):
    return int(proper.proper_layers(model)[name].user_ranks[u]) if u >= 0 else 0


def _proper_logits(model, ids, rows):
    with torch.no_grad(), proper.users(model, rows):
        return model(ids).logits


def _close(got, ref):
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= TOL * scale, (err, scale)


def test_single_user_matches_proper(setup, tmp_path):
    from peft import PeftModel

    base, model, ids = setup
    with torch.no_grad():
        plain = base(ids).logits
    outs = []
    for u in (0, 4, 5, -1):
        path = proper.export_peft_adapter(model, u, tmp_path / f"u{u}")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        with torch.no_grad():
            got = pm(ids).logits
        ref = _proper_logits(model, ids, [u] * len(ids))
        assert ref.isfinite().all()
        assert (ref - plain).abs().max() > 0.05 * ref.abs().max()     # the delta really moves the logits
        _close(got, ref)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[3])   # users differ


def test_mixed_batch_matches_proper(setup, tmp_path):
    from peft import PeftModel

    base, model, ids = setup
    index = proper.export_users(model, [0, 1, 4, 5, -1], tmp_path, progress=False)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "user_0", adapter_name="u0").eval()
    for u in (1, 4, 5, -1):
        pm.load_adapter(tmp_path / index["users"].get(str(u), index["cold_start"])["folder"], adapter_name=f"u{u}")
    rows = [0, 4, -1, 5, 1, 5, 0, -1]
    with torch.no_grad():
        got = pm(ids, adapter_names=[f"u{u}" for u in rows]).logits
    _close(got, _proper_logits(model, ids, rows))


def test_smallest_exact_rank(setup, tmp_path):
    _, model, _ = setup
    layers = proper.proper_layers(model)
    for u in (0, 4, 5, -1):
        path = proper.export_peft_adapter(model, u, tmp_path / f"u{u}")
        cfg = json.loads((path / "adapter_config.json").read_text())
        sd = load_file(str(path / "adapter_model.safetensors"))
        want = {n: TOP_K * R_E + _user_rank(model, u, n) for n in layers}
        got = {n: sd[f"base_model.model.{n}.lora_A.weight"].shape[0] for n in layers}
        assert got == want, u
        R = max(want.values())
        assert cfg["r"] == cfg["lora_alpha"] == R and not cfg["use_rslora"]
        for n, r in want.items():   # peft resolves every module's rank and alpha (scale alpha / r = 1)
            assert proper.io.peft._pattern_value(n, cfg["rank_pattern"], R) == r
            assert proper.io.peft._pattern_value(n, cfg["alpha_pattern"], R) == r
        assert all(t.isfinite().all() for t in sd.values())
        if u >= 0:   # the user's own rows come last, only its real rank of them
            n = "model.layers.1.mlp.down_proj"
            r_u = _user_rank(model, u, n)
            assert torch.equal(sd[f"base_model.model.{n}.lora_A.weight"][TOP_K * R_E:], layers[n].user_a[u, :r_u])
    assert _user_rank(model, 5, "model.layers.0.mlp.up_proj") == 0
    assert _user_rank(model, 4, "model.layers.0.mlp.up_proj") == 4


def test_max_rank_pads_exactly(setup, tmp_path):
    from peft import PeftModel

    base, model, ids = setup
    exact = proper.export_peft_adapter(model, 5, tmp_path / "exact")
    padded = proper.export_peft_adapter(model, 5, tmp_path / "padded", max_rank=24)
    cfg = json.loads((padded / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 24 and cfg["rank_pattern"] == {} == cfg["alpha_pattern"]
    e, p = load_file(str(exact / "adapter_model.safetensors")), load_file(str(padded / "adapter_model.safetensors"))
    for k, t in p.items():
        assert t.shape[0 if "lora_A" in k else 1] == 24
        r = e[k].shape[0 if "lora_A" in k else 1]
        head, tail = (t[:r], t[r:]) if "lora_A" in k else (t[:, :r], t[:, r:])
        assert torch.equal(head, e[k]) and not tail.any()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), padded).eval()
    with torch.no_grad():
        got = pm(ids).logits
    _close(got, _proper_logits(model, ids, [5] * len(ids)))


def test_export_follows_the_stage(setup, tmp_path):
    from peft import PeftModel

    base, model, ids = setup
    try:
        for stage, rank in (("group", TOP_K * R_E), ("population", R_E)):
            proper.set_stage(model, stage, init_experts=False)
            path = proper.export_peft_adapter(model, 2, tmp_path / stage)
            assert json.loads((path / "adapter_config.json").read_text())["r"] == rank
            pm = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
            with torch.no_grad():
                got = pm(ids).logits
            _close(got, _proper_logits(model, ids, [2] * len(ids)))
    finally:
        proper.set_stage(model, "user", init_experts=False)


def test_errors(setup, tmp_path):
    base, model, _ = setup
    for bad in (U, -2, True, 1.0):
        with pytest.raises(ValueError, match=r"'user_id' must be an int in \[-1, 6\)"):
            proper.export_peft_adapter(model, bad, tmp_path / "x")
    with pytest.raises(ValueError, match=r"every id in argument 'ids' must be an int in \[-1, 6\)"):
        proper.export_users(model, [0, 7], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"'max_rank' is 10, but module .* needs rank 16"):
        proper.export_peft_adapter(model, 0, tmp_path / "x", max_rank=10)
    with pytest.raises(TypeError, match="'dtype'"):
        proper.export_peft_adapter(model, 0, tmp_path / "x", dtype="bf16")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a peft adapter folder"):
        proper.export_peft_adapter(model, 0, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    cfg = proper.proper_layers(model)["model.layers.0.mlp.up_proj"].cfg
    cfg.extra["token_router"] = True
    try:
        with pytest.raises(ValueError, match=r"token_router.*per token"):
            proper.export_peft_adapter(model, 0, tmp_path / "x")
    finally:
        del cfg.extra["token_router"]
    plain = proper.apply_proper(copy.deepcopy(base), proper.ProperConfig(num_users=2, lora_router=False))
    with pytest.raises(ValueError, match="nothing runs for user -1"):
        proper.export_peft_adapter(plain, -1, tmp_path / "x")


def test_dtype_and_replace(setup, tmp_path):
    _, model, _ = setup
    path = proper.export_peft_adapter(model, 0, tmp_path / "a")
    proper.export_peft_adapter(model, 1, path, dtype=torch.bfloat16)   # replaces the old adapter folder
    sd = load_file(str(path / "adapter_model.safetensors"))
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    n = "model.layers.0.mlp.gate_proj"
    assert torch.equal(sd[f"base_model.model.{n}.lora_A.weight"][-R_U:],
                       proper.proper_layers(model)[n].user_a[1].to(torch.bfloat16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]   # no temp or old folders left behind


def _cli(argv, loader=lambda n: tiny_llama()):
    p = add_export_arguments(argparse.ArgumentParser())
    return run_export_args(p.parse_args(argv), model_loader=loader)


def test_cli_on_save_pretrained_folder(setup, tmp_path, capsys):
    from peft import PeftModel

    base, model, ids = setup
    proper.save_pretrained(model, tmp_path / "ckpt")
    out = tmp_path / "out"
    assert _cli([str(tmp_path / "ckpt"), "--users", "all,-1", "--out", str(out), "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "proper-peft-export" and index["stage"] == "user"
    assert sorted(index["users"], key=int) == [str(u) for u in range(U)]
    assert index["cold_start"]["folder"] == "cold_start" and index["max_rank"] == TOP_K * R_E + R_U
    rec = index["users"]["5"]
    assert rec["folder"] == "user_5" and rec["ranks"]["model.layers.0.mlp.up_proj"] == TOP_K * R_E
    assert rec["max_rank"] == TOP_K * R_E + 2 and "name" not in rec
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.json", "cold_start",
                                                            *(f"user_{u}" for u in range(U))])
    pm = PeftModel.from_pretrained(copy.deepcopy(base), out / "user_4").eval()
    with torch.no_grad():
        got = pm(ids).logits
    _close(got, _proper_logits(model, ids, [4] * len(ids)))
    assert "exported 7 adapters" in capsys.readouterr().out
    assert _cli([str(tmp_path / "ckpt"), "--users", "3,x", "--out", str(out)]) == 2
    assert _cli([str(tmp_path / "ckpt"), "--users", "6", "--out", str(out)]) == 2
    assert _cli([str(tmp_path / "ckpt"), "--users", "0", "--out", str(out), "--max-rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "got '3,x'" in err and "outside [-1, 6)" in err and "'max_rank' is 4" in err
    assert _cli([str(tmp_path / "nowhere"), "--users", "0", "--out", str(out)]) == 2
    assert "neither a `proper train --out` run folder" in capsys.readouterr().err


def test_cli_on_run_folder(setup, tmp_path):
    _, model, _ = setup
    run = tmp_path / "run"
    names = [f"name{u}" for u in range(U)]
    (run / "stages").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"train": {"num_layers": 2}, "users": names}))
    proper.set_stage(model, "group", init_experts=False)
    try:
        proper.save_pretrained(model, run / "stages" / "group")
    finally:
        proper.set_stage(model, "user", init_experts=False)
    proper.save_pretrained(model, run / "stages" / "user")
    seen = []
    out = tmp_path / "out"
    assert _cli([str(run), "--users", "3,0", "--out", str(out), "--max-rank", "16", "--no-progress"],
                loader=lambda n: seen.append(n) or tiny_llama()) == 0
    index = json.loads((out / "index.json").read_text())
    assert seen == [2] and index["stage"] == "user"          # the latest finished stage, the run's layers
    assert index["users"]["3"] == {"folder": "user_3", "name": "name3", "max_rank": 16,
                                   "ranks": {n: TOP_K * R_E + R_U for n in proper.proper_layers(model)}}
    assert list(index["users"]) == ["3", "0"] and index["cold_start"] is None
