"""The paged user store (ProperConfig(resident_users=S, user_store=...)): paging changes nothing, a user moves
only when its data is seen, lazy = eager initialisation, write-back on eviction, clear errors, incremental and
crash-safe saves, corrupt files named, dense <-> paged saves, imports into the store, the trainer through slots."""
import json
import os
import shutil

import pytest
import torch

import proper
from proper.store import ResidentUsersError, StoreError
from proper.store.segments import Segment
from proper_fixtures import peft_lora_state, tiny_llama

U = 16


def build(S=None, *, users=U, K=2, lora_router=True, **kw):
    cfg = proper.ProperConfig(num_users=users, num_experts=K, top_k=0, expert_rank=4, user_rank=4,
                              resident_users=S, lora_router=lora_router, **kw)
    m = proper.apply_proper(tiny_llama(seed=0), cfg)
    proper.set_stage(m, "user", init_experts=False)
    return m


def batches(steps, per=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(U, generator=g)[:per], torch.randint(0, 60, (per, 6), generator=g))
            for _ in range(steps)]


def train(m, plan, lr=1e-2):
    opt = proper.make_optimizer(m, lr=lr)
    for ids, x in plan:
        with proper.users(m, ids):
            loss = m(x).logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@torch.no_grad()
def user_logits(m, users=range(U)):
    x = torch.randint(0, 60, (U, 5), generator=torch.Generator().manual_seed(1))
    out = []
    for u in users:
        with proper.users(m, [u]):
            out.append(m(x[u:u + 1]).logits)
    return torch.cat(out)


def rows_of(m, u):
    """User u's per-user rows (no paging side effects beyond paging u in)."""
    st = proper.get_state(m)
    r = st.user_row(u)
    return {f"{n}.{k}": t[r].detach().clone() for n, layer in st.layers.items()
            for k, t in layer.adapter_tensors().items() if k in proper.store.ROW_KEYS}


# ------------------------------------------------------------------------------------------ paging = dense
@pytest.mark.parametrize("S", [16, 4, 3])
@pytest.mark.parametrize("lora_router", [True, False])
def test_paging_changes_nothing(S, lora_router):
    plan = batches(12)
    dense = build(None, lora_router=lora_router)
    train(dense, plan)
    paged = build(S, lora_router=lora_router)
    train(paged, plan)
    slots = proper.get_state(paged).slots
    if S < 16:
        assert slots.write_backs > 0 and slots.page_ins > U      # users really went out and came back
    # same batches, same math: equal to fp32 rounding (the token layout orders tokens by slot, not user id)
    torch.testing.assert_close(user_logits(paged), user_logits(dense))
    for u in range(U):
        want, got = rows_of(dense, u), rows_of(paged, u)
        for k in want:
            torch.testing.assert_close(got[k], want[k], msg=f"user {u} {k}")


def test_lazy_and_eager_initialisation_agree():
    dense, paged = build(None), build(2)
    for u in (0, 7, 15, 3):
        want, got = rows_of(dense, u), rows_of(paged, u)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (u, k)
    # and nothing was drawn per table size: the shared parts are identical too
    a, b = proper.proper_state_dict(dense), proper.proper_state_dict(paged)
    shared = [k for k in b if k in a]
    cold = [k for k in b if k.endswith(".router.cold_start")]
    assert len(cold) == 1 and len(shared) == len(b) - 1      # all but the paged (model-level) router's cold start
    for k in shared:
        assert torch.equal(a[k], b[k]), k


def test_absent_user_is_bit_identical():
    m = build(3)
    opt = proper.make_optimizer(m, lr=1e-2)
    x = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(3))

    def steps(*batches):
        for ids in batches:
            with proper.users(m, ids):
                loss = m(x).logits.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    steps([9, 1], [9, 2])                           # user 9 trains, then is absent
    before = rows_of(m, 9)
    steps([1, 2], [4, 5], [6, 2], [1, 4])           # evicts 9 (write-back), then other users train
    after = rows_of(m, 9)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before[next(k for k in before if k.endswith("user_b"))],
                           rows_of(build(3), 9)[next(k for k in before if k.endswith("user_b"))])  # it did train


def test_eviction_writes_back_and_moments_follow_the_user():
    m = build(2)
    opt = proper.make_optimizer(m, lr=1e-2)
    x = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(4))
    with proper.users(m, [5]):
        m(x).logits.pow(2).mean().backward()
    opt.step()
    slots = proper.get_state(m).slots
    s5 = slots.slot_of[5]
    trained = rows_of(m, 5)
    up_b = proper.proper_layers(m)["model.layers.0.mlp.up_proj"].user_b
    moment = {k: v[s5].clone() for k, v in opt.state[up_b].items()}
    with torch.no_grad():
        for u in (6, 7):                            # two other users take both slots: 5 is evicted
            with proper.users(m, [u]):
                m(x)
    assert 5 not in slots.slot_of and 5 in slots.store
    back = rows_of(m, 5)
    for k in trained:
        assert torch.equal(trained[k], back[k]), k
    st = opt.state[up_b]
    s = slots.slot_of[5]
    for k, v in moment.items():
        assert torch.equal(st[k][s], v), k
    assert float(st["step"][s]) == 1.0


def test_too_many_distinct_users_names_resident_users():
    m = build(2)
    with pytest.raises(ResidentUsersError, match="resident_users=2"):
        with torch.no_grad(), proper.users(m, [0, 1, 2]):
            pass
    with torch.no_grad(), proper.users(m, [0, 1]):          # two open blocks cannot need three slots
        with pytest.raises(ResidentUsersError, match="pinned by open users"):
            with proper.users(m, [2]):
                pass
    # a forward with gradients holds its users until the optimizer steps
    proper.make_optimizer(m)
    x = torch.randint(0, 60, (2, 4))
    with proper.users(m, [3, 4]):
        m(x).logits.sum().backward()
    with pytest.raises(ResidentUsersError, match="held for the coming optimizer step"):
        with proper.users(m, [5]):
            pass


def test_cold_start_needs_no_slot():
    m = build(1)
    with torch.no_grad(), proper.users(m, [-1, -1, 3]):
        m(torch.randint(0, 60, (3, 4)))
    assert proper.get_state(m).slots.resident_users() == [3]


# ------------------------------------------------------------------------------------------ saving
def test_paged_save_is_incremental_and_loads_lazily(tmp_path, monkeypatch):
    m = build(3)
    train(m, batches(6))
    d = proper.save_pretrained(m, tmp_path / "ck")
    segs = sorted(p.name for p in (d / "users").iterdir())
    size = sum((d / "users" / s).stat().st_size for s in segs)
    stored = proper.get_state(m).slots.store.user_ids()
    assert stored and len(stored) < U                        # users never trained are not stored
    # one more step on two users: the next save into the folder writes only those two
    train(m, [(torch.tensor([0, 1]), torch.randint(0, 60, (2, 6)))])
    proper.save_pretrained(m, d)
    segs2 = sorted(p.name for p in (d / "users").iterdir())
    new = [s for s in segs2 if s not in segs]
    assert len(new) == 1 and Segment(d / "users" / new[0]).users == [0, 1]
    assert sum((d / "users" / s).stat().st_size for s in new) < size
    want = user_logits(m)
    # opening reads headers only: no record is read until a user is paged in
    reads = []
    real = Segment.read
    monkeypatch.setattr(Segment, "read", lambda self, row: reads.append(row) or real(self, row))
    loaded = proper.from_pretrained(tiny_llama(seed=0), d)
    assert proper.get_state(loaded).cfg.resident_users == 3 and reads == []
    torch.testing.assert_close(user_logits(loaded), want, rtol=0, atol=0)


@pytest.mark.parametrize("src,dst", [(None, 3), (3, None), (3, 5)])
def test_dense_and_paged_saves_load_into_each_other(tmp_path, src, dst):
    m = build(src)
    train(m, batches(6))
    want = user_logits(m)
    proper.save_pretrained(m, tmp_path / "ck")
    loaded = proper.from_pretrained(tiny_llama(seed=0), tmp_path / "ck", resident_users=dst)
    assert proper.get_state(loaded).cfg.resident_users == dst
    torch.testing.assert_close(user_logits(loaded), want)


def test_corrupt_or_truncated_store_files_are_named(tmp_path):
    m = build(3)
    train(m, batches(4))
    d = proper.save_pretrained(m, tmp_path / "ck")
    seg = next((d / "users").iterdir())
    users = Segment(seg).users
    data = bytearray(seg.read_bytes())
    data[-10] ^= 0xFF                                         # one flipped byte in the last record
    seg.write_bytes(bytes(data))
    loaded = proper.from_pretrained(tiny_llama(), d)
    with pytest.raises(StoreError, match=rf"user {users[-1]}'s record in .*{seg.name}.*corrupt"):
        with torch.no_grad(), proper.users(loaded, [users[-1]]):
            pass
    seg.write_bytes(bytes(data[: len(data) // 2]))            # truncated
    with pytest.raises(StoreError, match=rf"{seg.name} is truncated"):
        proper.from_pretrained(tiny_llama(), d)
    seg.unlink()
    with pytest.raises(StoreError, match=rf"segment .*{seg.name} is missing"):
        proper.from_pretrained(tiny_llama(), d)


def test_folder_store_spills_and_reopens(tmp_path):
    folder = tmp_path / "store"
    m = build(2, user_store=str(folder))
    proper.get_state(m).slots.store.spill_bytes = 1           # every write-back spills into a segment
    train(m, batches(5, per=2))
    proper.get_state(m).slots.flush()
    proper.get_state(m).slots.store.spill()
    names = json.loads((folder / "manifest.json").read_text())["segments"]
    assert names and all((folder / n).is_file() for n in names)
    stored = proper.get_state(m).slots.store.user_ids()
    # a second model on the same folder sees the same users (its shared parts are fresh: compare user rows)
    m2 = build(2, user_store=str(folder))
    for u in stored[:3]:
        a, b = rows_of(m, u), rows_of(m2, u)
        for k in a:
            assert torch.equal(a[k], b[k]), (u, k)


def test_bf16_store_rounds_only_on_eviction():
    m = build(1, store_dtype="bfloat16")
    train(m, [(torch.tensor([2]), torch.randint(0, 60, (1, 6)))])
    before = rows_of(m, 2)
    with torch.no_grad(), proper.users(m, [3]):               # evicts 2 (bf16 write-back)
        pass
    after = rows_of(m, 2)
    for k, v in before.items():
        # the trained weights come back rounded to bf16; ranks, scales and the untrained router rows (not stored:
        # re-created from their seed) come back exact
        exact = v.dtype == torch.int64 or k.endswith("user_scale") or k.endswith("router.embedding.weight")
        want = v if exact else v.to(torch.bfloat16).float()
        assert torch.equal(after[k], want), k


def test_import_peft_into_the_store_and_export(tmp_path):
    dense, paged = build(None, K=0, lora_router=False), build(2, K=0, lora_router=False)
    sd, c = peft_lora_state(tiny_llama(), r=2, alpha=4, targets=("gate_proj", "up_proj", "down_proj"), seed=3)
    for m in (dense, paged):
        proper.import_peft_adapter(m, 11, sd, config=c)
    with torch.no_grad():
        for u in (0, 1, 2):                                   # 11 is evicted: the import was written back
            with proper.users(paged, [u]):
                pass
    assert 11 in proper.get_state(paged).slots.store
    torch.testing.assert_close(user_logits(paged, [11]), user_logits(dense, [11]))
    a = proper.export_peft_adapter(paged, 11, tmp_path / "p")
    b = proper.export_peft_adapter(dense, 11, tmp_path / "d")
    from safetensors.torch import load_file
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_user_gates_and_cold_start_through_slots():
    m = build(3, K=3)
    proper.set_stage(m, "group", init_experts=False)
    plan = batches(4)
    train(m, plan)
    g = proper.user_gates(m, list(range(U)))                 # more users than slots: routed in chunks
    assert g.shape[1] == U
    dense = build(None, K=3)
    proper.set_stage(dense, "group", init_experts=False)
    train(dense, plan)
    torch.testing.assert_close(g, proper.user_gates(dense, list(range(U))))
    proper.refresh_cold_start(m)
    stored = proper.get_state(m).slots.stored_users()
    want = proper.user_gates(dense, stored).mean(1)          # dense gates averaged over the stored users
    layer = next(iter(proper.proper_layers(m).values()))
    torch.testing.assert_close(layer.router.cold_start, want[0], atol=1e-6, rtol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="resident_users"):
        proper.ProperConfig(num_users=4, resident_users=5)
    with pytest.raises(ValueError, match="user_store.*needs 'resident_users'"):
        proper.ProperConfig(num_users=4, user_store="/tmp/x")
    with pytest.raises(ValueError, match="store_dtype"):
        proper.ProperConfig(num_users=4, resident_users=2, store_dtype="fp8")
    cfg = proper.ProperConfig(num_users=4, resident_users=2)
    assert "resident_users" not in cfg.saved_dict() and cfg.same_model(proper.ProperConfig(num_users=4))


def test_optimizer_state_dict_round_trip_paged(tmp_path):
    plan = batches(8)
    ref = build(3)
    train(ref, plan)                                          # straight through
    m = build(3)
    opt = train(m, plan[:4])
    d = proper.save_pretrained(m, tmp_path / "ck")
    sd = opt.state_dict()
    assert "proper_epoch" in sd
    m2 = proper.from_pretrained(tiny_llama(seed=0), d)        # a restart: fresh process state
    opt2 = proper.make_optimizer(m2, lr=1e-2)
    opt2.load_state_dict(sd)
    for ids, x in plan[4:]:
        with proper.users(m2, ids):
            loss = m2(x).logits.float().pow(2).mean()
        opt2.zero_grad()
        loss.backward()
        opt2.step()
    torch.testing.assert_close(user_logits(m2), user_logits(ref))


def test_memory_store_survives_its_checkpoint_folder_moving(tmp_path):
    """A memory store reads saved users from the save's segment files; the trainer renames checkpoint folders
    into place and deletes old ones: later saves still find every user (from the open memmaps)."""
    m = build(3)
    train(m, batches(4))
    proper.save_pretrained(m, tmp_path / "tmp")
    os.replace(tmp_path / "tmp", tmp_path / "moved")
    shutil.rmtree(tmp_path / "moved")
    want = user_logits(m)
    proper.save_pretrained(m, tmp_path / "again")
    torch.testing.assert_close(user_logits(proper.from_pretrained(tiny_llama(seed=0), tmp_path / "again")), want)
