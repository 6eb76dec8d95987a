"""HF-ecosystem training: UserIdCollator, standard collators carrying ``user_ids``, and the example that fine-tunes
the user stage with ``transformers.Trainer`` (examples/hf_trainer_user_stage.py --tiny, in a subprocess)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import proper

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_trainer_user_stage.py"
FEATS = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "user_ids": 3},
         {"input_ids": [5, 6], "labels": [-100, 6], "user_ids": -1}]


def test_collator_pads_and_carries_user_ids():
    batch = proper.UserIdCollator(pad_token_id=9)(FEATS)
    assert torch.equal(batch["user_ids"], torch.tensor([3, -1])) and batch["user_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [5, 6, 9]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [-100, 6, -100]]))
    assert FEATS[0]["user_ids"] == 3                              # the examples themselves are untouched

    seen = []
    batch = proper.UserIdCollator(lambda f: seen.append(f) or {"n": len(f)}, column="user_id")(
        [{"x": 1, "user_id": torch.tensor(2)}, {"x": 2, "user_id": 0}])
    assert seen == [[{"x": 1}, {"x": 2}]] and batch == {"n": 2, "user_ids": batch["user_ids"]}
    assert batch["user_ids"].tolist() == [2, 0]


def test_collator_errors_name_the_column():
    c = proper.UserIdCollator()
    with pytest.raises(KeyError, match="example 1 has no 'user_ids' column"):
        c([FEATS[0], {"input_ids": [1]}])
    for bad in (1.5, True, "3", torch.tensor([1, 2])):
        with pytest.raises(TypeError, match="example 0's 'user_ids' must be an int"):
            c([{"input_ids": [1], "user_ids": bad}])
    with pytest.raises(ValueError, match="empty"):
        c([])
    with pytest.raises(TypeError, match="'base_collator' must be callable"):
        proper.UserIdCollator(base_collator="pad")


def test_standard_collator_carries_a_user_ids_column():
    """What the README tells users of the stock collators: name the column user_ids and it comes through."""
    from transformers import DataCollatorForSeq2Seq

    tok = proper.load_smollm2_tokenizer()
    batch = DataCollatorForSeq2Seq(tok)([dict(f) for f in FEATS])
    assert torch.equal(batch["user_ids"], torch.tensor([3, -1]))
    wrapped = proper.UserIdCollator(DataCollatorForSeq2Seq(tok))(FEATS)
    assert torch.equal(wrapped["user_ids"], batch["user_ids"]) and torch.equal(wrapped["labels"], batch["labels"])


def test_example_imports_without_side_effects(capsys):
    spec = importlib.util.spec_from_file_location("hf_trainer_user_stage", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    spec.loader.exec_module(mod)
    assert capsys.readouterr() == ("", "")
    assert not [m for m in set(sys.modules) - before if m.split(".")[0] == "transformers"]   # nothing heavy yet
    args = mod.parse_args(["--tiny"])
    assert (args.num_layers, args.max_users, args.steps) == (2, 4, 3)


def test_example_trains_the_user_stage_with_trainer(tmp_path):
    """The tiny run, with activation checkpointing (the recomputation needs the users the keyword gave)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(EXAMPLE), "--tiny", "--checkpointing", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["steps"] == 3 and s["users"] == 4 and s["checkpointing"]
    assert max(s["users_per_batch"]) > 1                        # batches mix users
    assert s["user_rows_trained"] == 4                           # the ids reached every user's LoRA
    assert s["dev_loss_after"] < s["dev_loss_before"]
