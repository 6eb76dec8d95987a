"""`proper train` under torchrun: 2 CPU processes (gloo) train a tiny PROPER run on their slices of each
global batch and must finish with bit-identical weights (gradients averaged over the ranks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from proper.training import distributed as DD


def test_shard_unshard_round_trip():
    items = list(range(11))
    parts = [items[r::3] for r in range(3)]
    assert DD.unshard(parts) == items
    assert DD.shard(items) == items          # not distributed: one rank holds everything
    w = {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.bfloat16)}
    assert DD.gather_digests(w) == [DD.state_digest(w)]
    assert DD.state_digest({**w, "a": torch.tensor([1.0, 1.0 + 2**-20])}) != DD.state_digest(w)


@pytest.mark.slow
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_two_process_gloo_run_ends_with_identical_weights(tmp_path, paged):
    pytest.importorskip("proper.models")
    from proper import data as D

    try:
        D.movielens_100k_dir()
    except D.MissingDataError as e:
        pytest.skip(str(e))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "proper", "train", "--budget", "tiny", "--num-layers", "2", "--max-users", "4", "--seed", "1",
           "--batch-size", "4", "--steps-population", "3", "--steps-group", "3", "--steps-user", "3",
           "--eval-every", "3", "--max-history", "4", "--dev-max", "4", "--test-max", "8",
           "--ablations", "population+user", "--out", str(out), "--no-progress"]
    if paged:   # 8 users through 4 slots: users are evicted and paged back, each rank into its own store
        cmd[cmd.index("--max-users") + 1] = "8"
        cmd += ["--resident-users", "4"]
        cmd[cmd.index("--test-max") + 1] = "16"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    m = json.loads((out / "metrics.json").read_text())
    d = m["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    assert len(d["weights_sha256_per_rank"]) == 2 and len(set(d["weights_sha256_per_rank"])) == 1
    for stage in ("population", "group", "user"):
        assert m["stages"][stage]["steps_run"] == 3
    assert {"proper", "population+user", "user_mean"} <= m["systems"].keys()
    assert m["systems"]["proper"]["n"] == (16 if paged else 8)   # --test-max, scored across both ranks
    if paged:
        assert m["proper_config"]["resident_users"] == 4
        assert (out / "user_store" / "rank1").is_dir()
    # rank 1 wrote nothing of its own: one summary table on stdout
    assert r.stdout.count("metrics:") == 1
