"""--resume never unpickles code: trainer_state.pt loads with weights_only=True, and latest.json can only name a
checkpoint folder of the run (proper.training.checkpoints.resume / latest_checkpoint)."""
from __future__ import annotations

import json

import pytest
import torch

import proper
from proper.training.checkpoints import LATEST, STATE_NAME, latest_checkpoint, resume, save_checkpoint
from proper_fixtures import tiny_llama

CFG = dict(num_users=2, num_experts=2, expert_rank=2, user_rank=2, top_k=1)


class _CreatesFile:
    """A pickle payload: unpickling it calls open(path, "w"), which creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _checkpoint(root, name="user-000001"):
    """A folder holding a valid proper.save_pretrained save of a tiny model, named by latest.json."""
    d = root / name
    proper.save_pretrained(proper.apply_proper(tiny_llama(), proper.ProperConfig(**CFG)), d)
    (root / LATEST).write_text(json.dumps({"stage": "user", "step": 1, "finished": False, "dir": name}))
    return d


def test_a_crafted_trainer_state_runs_no_code(tmp_path):
    root = tmp_path / "checkpoints"
    d = _checkpoint(root)
    marker = tmp_path / "pwned"
    torch.save({"stage": "user", "step": 1, "finished": False, "optimizer": _CreatesFile(marker)}, d / STATE_NAME)
    with pytest.raises(ValueError, match=rf"{STATE_NAME}.*weights_only=True") as e:
        resume(root, tiny_llama())
    assert str(d / STATE_NAME) in str(e.value)
    assert not marker.exists(), "unpickling trainer_state.pt ran the payload"


@pytest.mark.parametrize("name", ["../x", "missing-000001", "a/b"])
def test_latest_json_names_only_a_checkpoint_folder_of_the_run(tmp_path, name):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (tmp_path / "x").mkdir()          # "../x" exists, but outside the run's checkpoints
    (root / "a" / "b").mkdir(parents=True)
    (root / LATEST).write_text(json.dumps({"dir": name}))
    with pytest.raises(ValueError, match=rf"latest.json names {name!r}, which is not a checkpoint folder"):
        latest_checkpoint(root)
    with pytest.raises(ValueError, match="latest.json"):
        resume(root, tiny_llama())


@pytest.mark.parametrize("text", ["{not json", "[]", '{"stage": "user"}'])
def test_a_bad_latest_json_is_a_clear_error(tmp_path, text):
    (tmp_path / LATEST).write_text(text)
    with pytest.raises(ValueError, match="is not a checkpoint pointer"):
        latest_checkpoint(tmp_path)


def test_no_checkpoint_resumes_nothing(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert resume(tmp_path, tiny_llama()) == (None, None)


def test_a_real_checkpoint_round_trips_with_weights_only(tmp_path):
    """What the trainer writes (optimizer state, early-stopping state with tensors) loads back exactly."""
    model = proper.apply_proper(tiny_llama(), proper.ProperConfig(**CFG))
    proper.set_stage(model, "user")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model(torch.tensor([[1, 2, 3]]), user_ids=torch.tensor([1])).logits.sum().backward()
    opt.step()
    es = {"best_loss": 1.5, "best_step": 3, "bad": 0, "stopped": False, "best": {"w": params[0].detach().clone()}}
    state = {"stage": "user", "step": 7, "finished": False, "optimizer": opt.state_dict(), "early_stopping": es}
    root = tmp_path / "checkpoints"
    save_checkpoint(root, model, state)

    fresh = tiny_llama()
    d, got = resume(root, fresh)
    assert d == root / "user-000007" and latest_checkpoint(root) == d
    assert (got["stage"], got["step"], got["finished"]) == ("user", 7, False)
    assert got["early_stopping"]["best_loss"] == 1.5 and torch.equal(got["early_stopping"]["best"]["w"],
                                                                      es["best"]["w"])
    saved = opt.state_dict()
    assert got["optimizer"]["param_groups"] == saved["param_groups"]
    assert got["optimizer"]["state"].keys() == saved["state"].keys() and saved["state"]
    for k, s in saved["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][k][n], v) for n, v in s.items()), k
    # the optimizer state loads into an optimizer over the resumed model's trainable parameters
    proper.set_stage(fresh, "user")
    torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2).load_state_dict(got["optimizer"])
    want = proper.io.proper_state_dict(model)
    have = proper.io.proper_state_dict(fresh)
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
