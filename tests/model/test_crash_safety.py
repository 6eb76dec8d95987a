"""SIGKILL a process that is saving, at random points, many times: the folder always loads as one complete save
(the previous one or the new one, never neither), and leftovers of a killed save are cleaned by the next. Dense
models and paged ones (their user store written as segment files before the commit point)."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import proper

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 24

# A small model without transformers (the child starts fast) whose saves are large enough (~6 MB) for a kill to
# land inside a write. Generation g stores the value g in every user B, so a loaded save names its generation.
CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import proper

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = nn.Linear(256, 256)

    def fill(m, gen):
        state = proper.get_state(m)
        with torch.no_grad():
            if state.slots is None:
                for layer in state.layers.values():
                    layer.user_b.fill_(float(gen))
                return
            for lo in range(0, 48, 4):   # every user, 4 slots at a time (the previous 4 are written back)
                rows = state.user_rows(list(range(lo, lo + 4)), write=True)
                for layer in state.layers.values():
                    layer.user_b[rows] = float(gen)

    out, gen, paged = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    m = proper.apply_proper(nn.Sequential(Block(), Block()), proper.ProperConfig(
        num_users=48, user_rank=8, target_modules=("up_proj",), resident_users=4 if paged else None))
    fill(m, gen)
    print("ready", flush=True)
    while True:
        gen += 1
        fill(m, gen)
        proper.save_pretrained(m, out)
        print(gen, flush=True)
""")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(256, 256)


def _generation(folder) -> int:
    m = proper.from_pretrained(nn.Sequential(Block(), Block()), folder, resident_users=None)   # every user read
    vals = {float(layer.user_b.flatten()[0]) for layer in proper.proper_layers(m).values()}
    gens = {float(v) for layer in proper.proper_layers(m).values() for v in layer.user_b.unique()}
    assert len(vals) == 1 and gens == vals, f"a save mixing generations {gens}"
    return int(vals.pop())


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_sigkill_during_save_always_leaves_a_loadable_save(tmp_path, paged):
    out = tmp_path / "save"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    last, outcomes = 0, {"old": 0, "new": 0}
    for trial in range(TRIALS):
        p = subprocess.Popen([sys.executable, str(script), str(out), str(last + 10_000), str(int(paged))],
                             stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        if not (out / "proper_model.safetensors").exists():
            continue                                     # killed before the first save ever finished
        gen = _generation(out)                           # never raises: one complete save is there
        outcomes["new" if gen > last else "old"] += 1
        last = gen
    assert sum(outcomes.values()) >= TRIALS // 2, outcomes
    # the next save removes what killed saves left behind
    m = proper.from_pretrained(nn.Sequential(Block(), Block()), out)
    proper.save_pretrained(m, out)
    assert sorted(os.listdir(out)) == ["proper_config.json", "proper_model.safetensors"] + (["users"] if paged else [])
    if paged:   # only the segments the last save names are left
        info = json.loads((out / "proper_config.json").read_text())
        assert sorted(os.listdir(out / "users")) == sorted(info["user_store"]["segments"])
    assert torch.isfinite(proper.proper_layers(m)["0.up_proj"].user_b).all()
