"""A tiny end-to-end run of the three-stage trainer on SmolLM2 (truncated to 2 decoder layers for speed) and
MovieLens-100K: the loss falls in every stage, frozen parameters stay bit-identical through stage 3, router
gradients are non-zero, --resume reproduces the same next losses, metrics.json has the systems."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proper import data as D  # noqa: E402
import proper  # noqa: E402
import proper.training as T  # noqa: E402
from proper.cli import train as CT  # noqa: E402


# ----------------------------------------------------------------------------------- fast unit checks
def test_expert_cosines_match_dense():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 5, generator=g), torch.randn(3, 4, 2, generator=g)
    dense = torch.stack([(b[k] @ a[k]).flatten() for k in range(3)])
    want = torch.nn.functional.cosine_similarity(dense[:, None], dense[None], dim=-1)
    torch.testing.assert_close(T.expert_cosines(a, b), want, rtol=1e-5, atol=1e-6)
    same = T.expert_cosines(a[:1].expand(2, -1, -1), b[:1].expand(2, -1, -1))
    torch.testing.assert_close(same, torch.ones(2, 2))


def test_encode_collate_masks_the_prompt():
    class Tok:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    exs = [D.Example("u", "abcdef", "4"), D.Example("v", "xy", "12")]
    enc = T.encode(Tok(), exs, [0, 1], max_len=5, add_eos=False)
    assert enc[0].ids == [ord(c) for c in "cdef4"] and enc[0].n_prompt == 4       # prompt cut from the left
    ids, mask, labels, rows = T.collate(enc, pad_id=0)
    assert ids.shape == (2, 5) and rows.tolist() == [0, 1]
    assert labels[0].tolist() == [-100] * 4 + [ord("4")]
    assert labels[1].tolist() == [-100, -100, ord("1"), ord("2"), -100] and mask[1].tolist() == [1, 1, 1, 1, 0]


def test_rating_metrics_use_sklearn_and_bucket():
    r = T.rating_metrics([1, 5, 3], [2, 5, 5], [10, 30, 300], y_expected=[1, 5, 3])
    assert r["mae"] == pytest.approx(1.0) and r["rmse"] == pytest.approx((5 / 3) ** 0.5)
    assert r["mae_expected"] == 0 and r["n"] == 3
    assert list(r["buckets"]) == ["<=20", "21-50", ">200"] and r["buckets"][">200"]["mae"] == 2


def test_config_validation():
    with pytest.raises(ValueError, match="--budget"):
        T.TrainConfig(budget="huge").resolved()
    with pytest.raises(ValueError, match="--stop-after"):
        T.TrainConfig(budget="tiny", stop_after="nope:1").resolved()
    c = T.TrainConfig(budget="tiny", steps_user=3).resolved()
    assert c.steps("user") == 3 and c.steps("group") == T.BUDGETS["tiny"]["steps_group"]
    # "full" is the default method on every user, paged by the user store, with longer group and user stages
    full, default = T.TrainConfig(budget="full", out="o").resolved(), T.TrainConfig(out="o").resolved()
    assert full.max_users == "all" and full.paging(943)[0] is not None and default.paging(128)[0] is None
    assert full.steps("user") > default.steps("user") and full.steps("group") > default.steps("group")
    assert (full.lr, full.user_lr, full.group_init, full.select_by) == (default.lr, default.user_lr, "ratings", "mae")


def test_lr_schedule():
    from proper.training.trainer import COSINE_FLOOR, lr_factor

    f = [lr_factor("cosine", s, 50) for s in range(50)]
    assert f[0] == 1.0 and abs(f[-1] - COSINE_FLOOR) < 1e-12 and all(a > b for a, b in zip(f, f[1:]))
    assert {lr_factor("constant", s, 50) for s in range(50)} == {1.0} and lr_factor("cosine", 0, 1) == 1.0
    with pytest.raises(ValueError, match="--lr-schedule"):
        T.TrainConfig(lr_schedule="linear").resolved()
    w = [lr_factor("constant", s, 50, warmup=10) for s in range(50)]
    assert w[0] == 0.1 and w[9] == 1.0 and set(w[9:]) == {1.0} and all(a < b for a, b in zip(w[:10], w[1:10]))
    assert lr_factor("cosine", 4, 50, warmup=10) == 0.5 * lr_factor("cosine", 4, 50)
    with pytest.raises(ValueError, match="--warmup-steps"):
        T.TrainConfig(warmup_steps=-1).resolved()


# ---------------------------------------------------------------------------------- end to end (slow)
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("proper.models")
    try:
        model, tok = T.load_model(num_layers=2)
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    return model, tok


@pytest.fixture(scope="module")
def movielens():
    return D.select_users(D.load_movielens_100k(), 4, seed=1)


def _cfg(out, **kw):
    base = dict(out=str(out), budget="tiny", max_users=4, seed=1, num_layers=2, batch_size=4, steps_population=4,
                steps_group=4, steps_user=4, eval_every=2, patience=100, num_experts=2, top_k=0, expert_rank=4,
                user_rank=2, max_history=4, dev_max=2, test_max=4, lr=2e-3, router_lr=1e-2, eval_batch_size=8)
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.fixture(scope="module")
def straight_run(smollm2, movielens, tmp_path_factory):
    """One uninterrupted tiny run; keeps the model it trained."""
    base, tok = smollm2
    box = {}

    def loader():
        box["model"] = copy.deepcopy(base)
        return box["model"], tok

    out = tmp_path_factory.mktemp("straight")
    metrics = T.run_train(_cfg(out), model_loader=loader, dataset=movielens, progress=False)
    return out, metrics, box["model"]


@pytest.mark.slow
def test_metrics_and_files(straight_run):
    out, metrics, _ = straight_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["systems"].keys() == metrics["systems"].keys()
    for name in ("user_mean", "item_mean", "base", "population", "group", "proper", "proper_no_lora_router",
                 "population+user", "proper_router_off_at_inference", "proper_cold_start"):
        r = metrics["systems"][name]
        assert r["n"] == 4 and 0 <= r["mae"] <= 4 and r["rmse"] >= r["mae"] - 1e-9, name
        assert sum(b["n"] for b in r["buckets"].values()) == 4
    assert metrics["data"]["users"] == 4
    groups = json.loads((out / "group_assignments.json").read_text())
    for stage in ("group", "user"):
        users = groups[stage]["users"]
        assert len(users) == 4
        for u in users.values():
            assert abs(sum(u["gates"]) - 1) < 1e-4 and 0 <= u["entropy"] <= groups[stage]["max_entropy"] + 1e-6
    for stage in T.STAGES:
        assert (out / "stages" / stage / "proper_model.safetensors").is_file()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["finished"] is True


@pytest.mark.slow
def test_per_user_selection_resets_exactly_the_users_it_did_not_help(straight_run):
    out, metrics, model = straight_run
    sel = metrics["stages"]["user"]["selection"]
    names = json.loads((out / "run_config.json").read_text())["users"]
    assert sel["users_kept"] + sel["users_reset"] == len(names) and len(sel["reset"]) == sel["users_reset"]
    for row, name in enumerate(names):   # a reset user's B is zero in every layer; a kept user's is not
        b = torch.stack([layer.user_b[row].abs().sum() for layer in proper.proper_layers(model).values()])
        assert bool((b == 0).all()) == (name in sel["reset"]), name


@pytest.mark.slow
def test_loss_falls_in_every_stage(straight_run):
    _, metrics, _ = straight_run
    for stage in T.STAGES:
        st = metrics["stages"][stage]
        assert st["steps_run"] == 4
        assert st["probe_loss_end"] < st["probe_loss_start"], (stage, st)


@pytest.mark.slow
def test_router_gradients_nonzero(straight_run):
    out, _, _ = straight_run
    hist = json.loads((out / "history.json").read_text())
    group = [h["router_grad_norm"] for h in hist["group"]["steps"]]
    user = [h["router_grad_norm"] for h in hist["user"]["steps"]]
    assert all(g > 0 for g in group), group
    # the LoRA-aware router reads the user LoRAs, whose B starts at zero: its gradient is zero at the very
    # first step by construction and non-zero once the user LoRAs have moved
    assert all(g > 0 for g in user[1:]), user
    assert all("lb" in h and "div" in h for h in hist["group"]["steps"])


@pytest.mark.slow
def test_frozen_parameters_bit_identical_through_user_stage(straight_run, smollm2):
    from safetensors.torch import load_file

    out, _, model = straight_run
    g = load_file(str(out / "stages" / "group" / "proper_model.safetensors"))
    u = load_file(str(out / "stages" / "user" / "proper_model.safetensors"))
    assert g.keys() == u.keys()
    frozen = [k for k in g if ".expert_" in k or ".router." in k or ".population_" in k]
    trained = [k for k in g if k.endswith(".user_b")]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(g[k], u[k]), k
    assert any(not torch.equal(g[k], u[k]) for k in trained)
    # the base model's own weights never change
    base, _ = smollm2
    ref = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if name in ref:
            assert torch.equal(p, ref[name]), name


@pytest.mark.slow
def test_resume_reproduces_the_next_losses(straight_run, smollm2, movielens, tmp_path):
    out_a, _, _ = straight_run
    base, tok = smollm2
    loader = lambda: (copy.deepcopy(base), tok)  # noqa: E731
    with pytest.raises(T.TrainingInterrupted):
        T.run_train(_cfg(tmp_path, stop_after="user:2", ablations=()), model_loader=loader, dataset=movielens,
                    progress=False)
    ptr = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert (ptr["stage"], ptr["step"], ptr["finished"]) == ("user", 1, False)   # step 2 is lost: < one interval
    T.run_train(_cfg(tmp_path, resume=True, ablations=()), model_loader=loader, dataset=movielens, progress=False)
    ha = json.loads((out_a / "history.json").read_text())["user"]["steps"]
    hb = json.loads((tmp_path / "history.json").read_text())["user"]["steps"]
    assert [h["step"] for h in hb] == list(range(4))
    for a, b in zip(ha[2:], hb[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    ma = json.loads((out_a / "metrics.json").read_text())["systems"]["proper"]
    mb = json.loads((tmp_path / "metrics.json").read_text())["systems"]["proper"]
    assert mb["mae"] == ma["mae"]


def test_token_router_run(smollm2, movielens, tmp_path):
    """--token-router reaches the model: a tiny run trains with per-token gates and records the switch."""
    import argparse

    a = CT.add_train_arguments(argparse.ArgumentParser()).parse_args(["--out", str(tmp_path), "--token-router"])
    assert CT.config_from_args(a).token_router is True
    base, tok = smollm2
    box = {}

    def loader():
        box["model"] = copy.deepcopy(base)
        return box["model"], tok

    cfg = _cfg(tmp_path / "run", token_router=True, steps_population=2, steps_group=2, steps_user=2, ablations=(),
               diagnostics=False)
    T.run_train(cfg, model_loader=loader, dataset=movielens, progress=False)
    layers = proper.proper_layers(box["model"]).values()
    assert all(layer.token_router.shape == (2, layer.in_features) for layer in layers)
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["proper"]["token_router"] is True


def test_the_population_stage_never_keeps_the_untrained_start(smollm2, movielens, tmp_path, monkeypatch):
    """select_by="mae": a dev evaluation at step -1 that beats every later one rolls the group and user stages back
    to their (trained) start, but the population stage keeps its best trained evaluation: its start is the base
    model without adapters (a 943-user run once rolled 400 population steps back to it on a 0.018 MAE tie)."""
    base, tok = smollm2
    evals = iter(range(1000))

    def scripted(self):   # each stage's start scores best; later evaluations worse, the last one least so
        i = next(evals)
        start = not self.state["history"][self.stage_now]["evals"]
        mae = 0.5 if start else 1.5 - 0.01 * i
        return {"dev_loss": 1.0 if start else 2.0 - 0.01 * i, "dev_mae": mae, "dev_mae_median": mae}

    run_stage = T.Trainer.run_stage

    def tracked(self, stage, resume=None):
        self.stage_now = stage
        return run_stage(self, stage, resume)

    monkeypatch.setattr(T.Trainer, "dev_loss", scripted)
    monkeypatch.setattr(T.Trainer, "run_stage", tracked)
    cfg = _cfg(tmp_path / "run", select_by="mae", steps_population=4, steps_group=2, steps_user=2, eval_every=2,
               ablations=(), diagnostics=False)
    T.run_train(cfg, model_loader=lambda: (copy.deepcopy(base), tok), dataset=movielens, progress=False)
    stages = json.loads((tmp_path / "run" / "progress.json").read_text())["stages"]
    assert stages["population"]["best_step"] == 3          # the better of its two trained evaluations
    assert stages["group"]["best_step"] == -1 and stages["user"]["best_step"] == -1


def test_ema_and_group_lr_runs_evaluate_the_average_and_resume_it(smollm2, movielens, tmp_path):
    """--ema-decay: the dev evaluations and the stage's result are the average (the group stage starts from the
    population's best dev loss); the average survives a resume. --group-lr sets the experts' rate."""
    import argparse

    a = CT.add_train_arguments(argparse.ArgumentParser()).parse_args(["--out", str(tmp_path), "--ema-decay", "0.5",
                                                                      "--group-lr", "3e-4"])
    c = CT.config_from_args(a)
    assert (c.ema_decay, c.group_lr) == (0.5, 3e-4)
    with pytest.raises(ValueError, match="--ema-decay"):
        T.TrainConfig(budget="tiny", ema_decay=1.0).resolved()
    base, tok = smollm2
    loader = lambda: (copy.deepcopy(base), tok)  # noqa: E731
    kw = dict(steps_population=4, steps_group=4, steps_user=2, ablations=(), diagnostics=False, group_lr=3e-4)
    hist, states = {}, {}
    for name, ema in (("raw", 0.0), ("ema", 0.5)):
        T.run_train(_cfg(tmp_path / name, ema_decay=ema, **kw), model_loader=loader, dataset=movielens,
                    progress=False)
        hist[name] = json.loads((tmp_path / name / "history.json").read_text())
        states[name] = json.loads((tmp_path / name / "progress.json").read_text())["stages"]
    for name in ("raw", "ema"):   # the group stage starts from the weights the population stage kept
        assert hist[name]["group"]["evals"][0]["dev_loss"] == pytest.approx(
            states[name]["population"]["best_dev_loss"], rel=1e-5)
    raw, avg = ([e["dev_loss"] for e in hist[n]["population"]["evals"]] for n in ("raw", "ema"))
    assert raw[0] == avg[0] and all(abs(x - y) > 1e-6 for x, y in zip(raw[1:], avg[1:]))
    with pytest.raises(T.TrainingInterrupted):
        T.run_train(_cfg(tmp_path / "cut", ema_decay=0.5, stop_after="group:2", **kw), model_loader=loader,
                    dataset=movielens, progress=False)
    from proper.training import checkpoints as TC

    ck = TC.latest_checkpoint(tmp_path / "cut" / "checkpoints")
    state = torch.load(ck / TC.STATE_NAME, map_location="cpu", weights_only=True)
    assert state["stage"] == "group" and "ema" in state["early_stopping"]
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs["shared"] == 3e-4, lrs
    T.run_train(_cfg(tmp_path / "cut", ema_decay=0.5, resume=True, **kw), model_loader=loader, dataset=movielens,
                progress=False)
    cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    for a, b in zip(hist["ema"]["group"]["evals"], cut["group"]["evals"]):
        assert b["dev_loss"] == pytest.approx(a["dev_loss"], rel=1e-5)


def test_cli_arguments(tmp_path):
    import argparse

    p = CT.add_train_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--data", "movielens-100k", "--max-users", "all", "--seed", "3", "--out", str(tmp_path),
                      "--budget", "tiny", "--steps-user", "2", "--target-modules", "up_proj,down_proj"])
    c = CT.config_from_args(a).resolved()
    assert c.max_users == "all" and c.seed == 3 and c.steps_user == 2 and c.target_modules == ("up_proj", "down_proj")
    assert CT.main_train(["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path), "--budget", "tiny"]) == 2


@pytest.mark.slow
def test_generation_data_end_to_end(smollm2, tmp_path):
    """Free-text targets (the JSONL schema, as LaMP-4/5/7 give): the same stages, scored with ROUGE."""
    base, tok = smollm2
    lines = []
    for u, word in (("ann", "sunny"), ("bob", "rainy"), ("cy", "windy")):
        for i in range(6):
            lines.append(json.dumps({"user": u, "input": f"Describe day {i}: ", "target": f"a {word} day",
                                     "time": i}))
    p = tmp_path / "gen.jsonl"
    p.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path / "run", data=str(p), max_users="all", steps_population=2, steps_group=2, steps_user=2,
               max_new_tokens=4, test_max=None, ablations=())
    m = T.run_train(cfg, model_loader=lambda: (copy.deepcopy(base), tok), progress=False)
    assert m["task"] == "generation"
    for name in ("base", "population", "group", "proper", "proper_cold_start"):
        r = m["systems"][name]
        assert r["n"] == 6 and 0 <= r["rouge1"] <= 1 and 0 <= r["rougeL"] <= 1, name
    assert "user_mean" not in m["systems"]


@pytest.mark.slow
def test_ablations_start_from_the_frozen_parts(straight_run):
    from safetensors.torch import load_file

    out, metrics, _ = straight_run
    main = load_file(str(out / "stages" / "user" / "proper_model.safetensors"))
    for name in ("population+user", "proper_no_lora_router"):
        ck = out / "ablations" / name / "checkpoints"
        d = json.loads((ck / "latest.json").read_text())["dir"]
        abl = load_file(str(ck / d / "proper_model.safetensors"))
        shared = [k for k in abl if ".population_" in k or ".expert_" in k or ".router." in k]
        assert shared and all(torch.equal(abl[k], main[k]) for k in shared), name
        assert not any(".lora_router." in k for k in abl), name
        assert metrics["stages"][name]["probe_loss_end"] < metrics["stages"][name]["probe_loss_start"]
    pu = load_file(str(out / "ablations" / "population+user" / "checkpoints" /
                       json.loads((out / "ablations" / "population+user" / "checkpoints" / "latest.json")
                                  .read_text())["dir"] / "proper_model.safetensors"))
    assert not any(".expert_" in k for k in pu)


def test_lamp_without_golds_is_refused_before_loading_a_model(tmp_path):
    q = tmp_path / "dev_questions.json"
    q.write_text(json.dumps([{"id": "1", "input": "x", "profile": [
        {"text": "a", "score": "2", "id": "p1"}, {"text": "b", "score": "3", "id": "p2"}]}]))

    def loader():
        raise AssertionError("the model must not be loaded")

    with pytest.raises(D.DataError, match="no outputs"):
        T.run_train(T.TrainConfig(data=str(q), out=str(tmp_path / "o"), budget="tiny"), model_loader=loader)


def test_paired_bootstrap():
    from proper.training.report import paired_bootstrap

    same = paired_bootstrap([1, 0, 2, 1], [1, 0, 2, 1])
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random(200), rng.random(200) + 0.5
    r = paired_bootstrap(a, b)
    assert r["hi"] < 0 and r["lo"] < r["diff"] < r["hi"] and r["n"] == 200


@pytest.mark.slow
def test_report_and_predictions_of_the_run(straight_run, tmp_path):
    from proper.training.report import write_report

    out, metrics, _ = straight_run
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds["examples"]) == 4 and set(metrics["systems"]) <= set(preds["systems"])
    y = [float(e["target"]) for e in preds["examples"]]
    mae = sum(abs(p - t) for p, t in zip(preds["systems"]["proper"]["pred"], y)) / len(y)
    assert mae == pytest.approx(metrics["systems"]["proper"]["mae"])
    text = write_report(out, tmp_path / "r.md").read_text()
    assert "| proper |" in text and "95% CI" in text and "| proper_cold_start |" in text
    assert (tmp_path / "r_by_profile.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def movielens8():
    return D.select_users(D.load_movielens_100k(), 8, seed=1)


@pytest.mark.slow
def test_paged_run_equals_the_dense_one_and_resumes(smollm2, movielens8, tmp_path):
    """8 users through 4 slots (evictions every step) train as with all 8 resident; an interrupted paged run
    resumes with the users' weights and Adam moments from the checkpoint's store."""
    base, tok = smollm2
    loader = lambda: (copy.deepcopy(base), tok)  # noqa: E731
    kw = dict(max_users=8, eval_batch_size=4, ablations=("proper_no_lora_router",))
    dense = T.run_train(_cfg(tmp_path / "dense", resident_users="all", **kw), model_loader=loader,
                        dataset=movielens8, progress=False)
    paged = T.run_train(_cfg(tmp_path / "paged", resident_users=4, **kw), model_loader=loader, dataset=movielens8,
                        progress=False)
    assert dense["proper_config"]["resident_users"] is None and paged["proper_config"]["resident_users"] == 4
    assert (tmp_path / "paged" / "stages" / "user" / "users").is_dir()
    for name, r in dense["systems"].items():
        p = paged["systems"][name]
        assert p["mae"] == r["mae"], name
        if "nll" in r:   # the token layout orders tokens by slot, not by user id: equal to fp32 rounding
            assert p["nll"] == pytest.approx(r["nll"], rel=1e-5), name
    hd = json.loads((tmp_path / "dense" / "history.json").read_text())
    hp = json.loads((tmp_path / "paged" / "history.json").read_text())
    for stage in T.STAGES:
        for a, b in zip(hd[stage]["steps"], hp[stage]["steps"]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (stage, a["step"])
    res = tmp_path / "resumed"
    with pytest.raises(T.TrainingInterrupted):
        T.run_train(_cfg(res, resident_users=4, stop_after="user:2", **kw), model_loader=loader, dataset=movielens8,
                    progress=False)
    T.run_train(_cfg(res, resident_users=4, resume=True, **kw), model_loader=loader, dataset=movielens8,
                progress=False)
    hr = json.loads((res / "history.json").read_text())["user"]["steps"]
    for a, b in zip(hp["user"]["steps"][2:], hr[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]
