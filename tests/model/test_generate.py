"""generate_for_users: (user, prompt) pairs in, each user's text out; greedy and seeded sampling."""
from __future__ import annotations

import pytest
import torch

import proper
from proper_fixtures import randomize_b


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = proper.load_smollm2_tokenizer()
    torch.manual_seed(0)
    # a tiny random Llama over SmolLM2's real vocabulary: real tokenizer, fast forwards
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     pad_token_id=tok.pad_token_id, eos_token_id=-1)).eval()
    proper.apply_proper(m, proper.ProperConfig(num_users=3, num_experts=2, top_k=1, user_rank=4,
                                               target_modules=("q_proj", "v_proj", "up_proj")))
    randomize_b(m, std=1.0)
    return m, tok


PAIRS = [(0, "Hello there"), (2, "A much longer prompt that needs left padding"), (-1, "Hi"), (2, "Hello there")]


def test_greedy_matches_one_pair_at_a_time(setup):
    m, tok = setup
    side = tok.padding_side
    tok.padding_side = "right"                       # the helper pads left whatever the tokenizer says
    outs = proper.generate_for_users(m, tok, PAIRS, max_new_tokens=5)
    assert tok.padding_side == "right"
    tok.padding_side = side
    assert len(outs) == 4 and all(isinstance(o, str) and o for o in outs)
    alone = [proper.generate_for_users(m, tok, [p], max_new_tokens=5)[0] for p in PAIRS]
    assert outs == alone
    assert outs[0] != outs[3]                        # same prompt, different users
    assert proper.generate_for_users(m, tok, PAIRS, max_new_tokens=5, batch_size=3) == outs
    with torch.no_grad(), proper.users(m, [0]):       # the text is what generate produced, decoded
        enc = tok(["Hello there"], return_tensors="pt")
        ids = m.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert outs[0] == tok.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def test_sampling_is_reproducible_with_a_seed(setup):
    m, tok = setup
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = proper.generate_for_users(m, tok, PAIRS, max_new_tokens=6, do_sample=True, seed=7, temperature=1.5)
    assert torch.equal(torch.get_rng_state(), state)                     # the global RNG is untouched
    b = proper.generate_for_users(m, tok, PAIRS, max_new_tokens=6, do_sample=True, seed=7, temperature=1.5)
    c = proper.generate_for_users(m, tok, PAIRS, max_new_tokens=6, do_sample=True, seed=8, temperature=1.5)
    greedy = proper.generate_for_users(m, tok, PAIRS, max_new_tokens=6)
    assert a == b and a != c and a != greedy


def test_bad_pairs(setup):
    m, tok = setup
    with pytest.raises(TypeError, match=r"\(user_id: int, prompt: str\) pairs; item 1"):
        proper.generate_for_users(m, tok, [(0, "a"), ("x", 0)])
    with pytest.raises(ValueError, match=r"in \[-1, 3\)"):
        proper.generate_for_users(m, tok, [(3, "a")])
    assert proper.generate_for_users(m, tok, []) == []
