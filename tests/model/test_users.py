"""proper.users(): per-sequence users through forward, generate (left padding + KV cache) and training steps;
missing context, thread safety, exception safety, bad ids."""
from __future__ import annotations

import threading

import pytest
import torch

import proper
from proper_fixtures import patched_llama, randomize_b, smollm2, tiny_llama


def _until_eos(tokens, eos):
    tokens = tokens.tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_generate_left_padding_kv_cache_matches_each_user_alone():
    model, tok = smollm2()
    cfg = proper.ProperConfig(num_users=6, num_experts=2, top_k=1, user_rank=4, backend="torch")
    proper.apply_proper(model, cfg)
    randomize_b(model, std=0.1, seed=3)
    prompts = ["The weather today is", "Write one word:", "Paris is the capital of", "My name"]
    user_ids = [4, 0, -1, 4]
    tok.padding_side = "left"                                       # decoder-only batched generation
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc.attention_mask[:, 0] == 0).any()                     # left padding really happens
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        with proper.users(model, user_ids):
            batched = model.generate(**enc, **kw)[:, enc.input_ids.shape[1]:]
        for i, (u, p) in enumerate(zip(user_ids, prompts)):
            one = tok([p], return_tensors="pt")
            with proper.users(model, [u]):
                alone = model.generate(**one, **kw)[0, one.input_ids.shape[1]:]
            assert _until_eos(batched[i], eos) == _until_eos(alone, eos), (i, u)
        # the adapters matter: users 4 and 0 on the same prompt get different logits
        one = tok([prompts[0]] * 2, return_tensors="pt")
        with proper.users(model, [4, 0]):
            logits = model(**one).logits
    assert (logits[0] - logits[1]).abs().max() > 1e-2


_patched = patched_llama


def test_training_step_mixed_users_touches_only_their_adapters():
    m = _patched().train()
    ids = torch.randint(1, 64, (4, 6))
    with proper.users(m, [1, 4, 1, -1]):
        m(ids, labels=ids).loss.backward()
    for name, layer in proper.proper_layers(m).items():
        for g in (layer.user_a.grad, layer.user_b.grad):
            per_user = g.flatten(1).abs().sum(1)
            assert per_user[[1, 4]].min() > 0, name
            assert per_user[[0, 2, 3, 5]].sum() == 0, name
        assert layer.lora_router.head.weight.grad.abs().sum() > 0
        assert layer.expert_a.grad is None and layer.user_router.table.weight.grad is None   # frozen in "user"
        assert layer.weight.grad is None


def test_group_stage_grads_reach_experts_and_router_rows_of_the_batch():
    m = _patched("group").train()
    ids = torch.randint(1, 64, (3, 6))
    with proper.users(m, [2, 5, 2]):
        m(ids, labels=ids).loss.backward()
    layer = proper.proper_layers(m)["model.layers.1.mlp.down_proj"]
    emb = layer.user_router.table.weight.grad.abs().sum(1)   # the model-level router (router_scope="model")
    assert emb[[2, 5]].min() > 0 and emb[[0, 1, 3, 4]].sum() == 0
    assert layer.expert_b.grad.abs().sum() > 0 and layer.user_b.grad is None


def test_missing_context_and_population_stage():
    m = _patched()
    ids = torch.randint(1, 64, (2, 4))
    with pytest.raises(proper.MissingUsersError, match=r"outside a users context.*proper.users\(model, user_ids\)"):
        m(ids)
    with pytest.raises(proper.MissingUsersError):
        m.generate(ids, max_new_tokens=2)
    proper.set_stage(m, "population")
    m(ids)                                   # the population LoRA needs no users


def test_context_restored_after_exception_and_nesting():
    m = _patched()
    ids = torch.randint(1, 64, (2, 4))
    with torch.no_grad(), proper.users(m, [0, 1]):
        want01 = m(ids).logits
    with pytest.raises(KeyError):
        with proper.users(m, [0, 1]):
            raise KeyError("boom")
    with pytest.raises(proper.MissingUsersError):
        m(ids)
    other = _patched()
    with torch.no_grad(), proper.users(m, [0, 1]):
        with proper.users(other, [3, 3]), proper.users(m, [2, 3]):     # inner context of the same model wins
            assert not torch.allclose(m(ids).logits, want01)
        assert torch.equal(m(ids).logits, want01)                      # restored on exit
        with pytest.raises(proper.MissingUsersError):
            _patched()(ids)


def test_threads_see_only_their_own_users():
    m = _patched()
    ids = torch.randint(1, 64, (2, 5))
    expected = {}
    with torch.no_grad():
        for us in ([0, 1], [4, 5]):
            with proper.users(m, us):
                expected[tuple(us)] = m(ids).logits
    errors, barrier = [], threading.Barrier(3)

    def work(us):
        try:
            barrier.wait()
            for _ in range(5):
                with torch.no_grad(), proper.users(m, us):
                    got = m(ids).logits
                if not torch.equal(got, expected[tuple(us)]):
                    errors.append(f"{us}: wrong users")
        except Exception as e:   # noqa: BLE001 - surfaced below
            errors.append(repr(e))

    def no_context():
        barrier.wait()
        try:
            m(ids)
            errors.append("a thread without context ran")
        except proper.MissingUsersError:
            pass

    with proper.users(m, [0, 1]):      # the main thread's context is not inherited by new threads
        threads = [threading.Thread(target=work, args=(us,)) for us in ([0, 1], [4, 5])]
        threads.append(threading.Thread(target=no_context))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_bad_ids_and_batch_mismatch():
    m = _patched()
    for bad, exc, msg in (([0, 6], ValueError, r"in \[-1, 6\).*got 6"), ([-2], ValueError, "got -2"),
                          (torch.tensor([0.0]), TypeError, "integers"), (torch.zeros(2, 2, dtype=torch.long),
                                                                       ValueError, "1-D"),
                          ([], ValueError, "non-empty")):
        with pytest.raises(exc, match=msg):
            with proper.users(m, bad):
                pass
    with pytest.raises(ValueError, match="holds 2 user ids but a forward got batch size 3"):
        with proper.users(m, [0, 1]):
            m(torch.randint(1, 64, (3, 4)))
    with pytest.raises(ValueError, match="no PROPER layers"):
        with proper.users(tiny_llama(), [0]):
            pass


def test_expanded_batch_repeats_each_users_rows():
    """generate(num_return_sequences=n) repeats every row n times: each copy keeps its user."""
    m = _patched()
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad(), proper.users(m, [0, 5]):
        one = m(ids).logits
        rep = m(ids.repeat_interleave(3, 0)).logits
    torch.testing.assert_close(rep, one.repeat_interleave(3, 0))
    with torch.no_grad(), proper.users(m, [0, 5]):
        out = m.generate(ids, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert out.shape == (4, 8)


def test_inference_routing_cache_follows_in_place_updates():
    """Under no_grad the routing is cached for the context; an in-place parameter update must invalidate it."""
    m = _patched()
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad(), proper.users(m, [0, 1]):
        before = m(ids).logits
        assert torch.equal(m(ids).logits, before)                    # cached routing, same result
        for layer in proper.proper_layers(m).values():
            if "router" in layer._modules:   # the model-level router lives in the first layer
                layer.router.proj.weight.mul_(-3.0)
            layer.lora_router.head.bias.fill_(0.5)
        after = m(ids).logits
    with torch.no_grad(), proper.users(m, [0, 1]):
        fresh = m(ids).logits
    assert not torch.allclose(after, before) and torch.equal(after, fresh)
