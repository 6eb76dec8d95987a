"""Model-level speed comparisons shared by `proper demo` and the benchmarks: the serving set-ups and the timer.

The issue-5 serving set-up: every one of the seven Llama projections adapted, user rank 16 plus K = 8 group
experts of rank 16 with top-2 gates and the LoRA-aware router, one user per prompt; peft's mixed-adapter batch
with one rank-16 adapter per user on the same projections as the baseline people use today.
"""
from __future__ import annotations

import copy
import statistics
from typing import List, Optional, Sequence

import torch

import proper
from proper.generation import left_padding

from .timing import interleaved_times

LLAMA7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOPICS = ["the sea", "a small red bicycle", "how bread rises", "the moon landing", "jazz", "learning Python",
          "a rainy Monday in a big city", "cats", "chess openings", "the history of paper", "volcanoes",
          "a recipe for soup", "why the sky is blue", "trains", "gardening in spring", "the first computer"]


def demo_prompts(n: int) -> List[str]:
    """n prompts of different lengths (the batch needs left padding, as real traffic does)."""
    return [f"Write a few words about {TOPICS[i % len(TOPICS)]}" + (" please" * (i % 3)) for i in range(n)]


@torch.no_grad()
def randomize(model, std: float = 0.02, seed: int = 0) -> None:
    """Non-zero B everywhere (experts, users) and a live LoRA-aware router: the realistic served state."""
    g = torch.Generator().manual_seed(seed)
    for layer in proper.proper_layers(model).values():
        for name, p in layer.named_parameters():
            if name.endswith("_b") or name.startswith("lora_router.head"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_proper_serving(base, users: int, backend: str = "auto", copy_base: bool = False,
                         adapter_dtype: Optional[str] = None):
    """`base` with proper's user stage on all seven projections (K = 8 experts r16 top-2 + user LoRA r16);
    ``adapter_dtype="bfloat16"``: the same weights held in bf16 (ProperConfig.adapter_dtype)."""
    cfg = proper.ProperConfig(num_users=users, num_experts=8, expert_rank=16, user_rank=16, top_k=2, alpha=32,
                              target_modules=LLAMA7, lora_router=True, backend=backend, adapter_dtype=adapter_dtype)
    model = proper.apply_proper(copy.deepcopy(base) if copy_base else base, cfg)
    randomize(model)
    proper.set_stage(model, "user")
    return model.eval()


def build_peft_mixed(base, users: int, copy_base: bool = False):
    """peft with one rank-16 adapter per user ("u0".."u{n-1}") on all seven projections, non-zero B."""
    from peft import LoraConfig, get_peft_model

    pm = None
    for u in range(users):
        c = LoraConfig(r=16, lora_alpha=32, target_modules=list(LLAMA7), lora_dropout=0.0, init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(copy.deepcopy(base) if copy_base else base, c, adapter_name=f"u{u}")
        else:
            pm.add_adapter(f"u{u}", c)
    return pm.eval()


@torch.no_grad()
def generate_once(model, tok, prompts: Sequence[str], users: Optional[Sequence], new_tokens: int):
    """One greedy batched generate of exactly `new_tokens` tokens (EOS suppressed: equal work per provider).

    users: None (plain model), ints (proper user ids) or strings (peft adapter_names).
    """
    with left_padding(tok):   # the caller's tokenizer settings are restored after
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(next(model.parameters()).device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)
    if users is None:
        return model.generate(**enc, **kw)
    if isinstance(users[0], str):
        return model.generate(**enc, **kw, adapter_names=list(users))
    with proper.users(model, torch.tensor(list(users))):
        return model.generate(**enc, **kw)


def time_generate_interleaved(setups, prompts, new_tokens: int, reps: int = 3) -> dict:
    """Median wall seconds of :func:`generate_once` per set-up; ``setups`` maps a name to (model, tok, users).
    One warm-up each (2 tokens), then ``reps`` interleaved rounds (proper.bench.timing.interleaved_times)."""
    for model, tok, users in setups.values():
        generate_once(model, tok, prompts, users, min(2, new_tokens))
    fns = {name: (lambda m=m, t=t, u=u: generate_once(m, t, prompts, u, new_tokens))
           for name, (m, t, u) in setups.items()}
    return {name: statistics.median(v) for name, v in interleaved_times(fns, reps, warmup=0).items()}
