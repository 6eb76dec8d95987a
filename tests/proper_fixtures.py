"""Shared helpers for the tests/test_proper_*.py files: the embedded SmolLM2 (loaded once per session, handed
out as deep copies), tiny random models of other families, and peft adapters with non-zero random B."""
from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"          # nothing may come from a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from proper import LLAMA_ALL_TARGETS as LLAMA7  # noqa: E402


@functools.lru_cache(maxsize=1)
def _smollm2():
    from proper.models import load_smollm2

    return load_smollm2()


def smollm2():
    """(fresh deep copies of SmolLM2-135M in fp32 and of its tokenizer)."""
    model, tok = _smollm2()
    return copy.deepcopy(model), copy.deepcopy(tok)   # a test may set padding_side: never for the next one


@pytest.fixture
def smol():
    return smollm2()


def tiny_llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32)).eval()


@torch.no_grad()
def randomize_b(model, std=0.05, seed=0):
    """Give every PROPER B (population, experts, users) random values, so each part changes the output."""
    import proper

    g = torch.Generator().manual_seed(seed)
    for layer in proper.proper_layers(model).values():
        for name, p in layer.named_parameters():
            if name.endswith("_b"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_lora_state(base_model, r, alpha, targets, seed, std=0.05):
    """A peft LoRA (random A, non-zero random B) on a copy of `base_model`: (state dict, config dict)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(base_model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (std if "lora_B" in n else 1 / p.shape[-1] ** 0.5))
    return get_peft_model_state_dict(pm), cfg.to_dict()


def patched_llama(stage="user", *, router_head: bool = False, **kw):
    """A tiny Llama patched on all seven projections (6 users, K = 3 top-2, user rank 4 unless ``kw`` says
    otherwise) with random B everywhere; ``router_head``: a random LoRA-aware router head too (it starts at
    zero: w = 1, no gate correction)."""
    import proper

    cfg = dict(num_users=6, num_experts=3, top_k=2, user_rank=4, target_modules=LLAMA7)
    cfg.update(kw)
    m = proper.apply_proper(tiny_llama(), proper.ProperConfig(**cfg))
    randomize_b(m, std=0.2)
    if router_head:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in proper.proper_layers(m).values():
                if hasattr(layer, "lora_router"):
                    w = layer.lora_router.head.weight
                    w.copy_(torch.randn(w.shape, generator=g))
    proper.set_stage(m, stage, init_experts=False)
    return m
