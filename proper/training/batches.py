"""Tokenised examples and their batches (right-padded ids, masks, target-only labels, user rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from .. import data as D

from ..state import STAGES

# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """Token ids of one example: ``ids = prompt + target``; ``n_prompt`` tokens of it are the prompt."""

    ids: List[int]
    n_prompt: int
    row: int          # user row (LoRA slot), -1 = unknown user


def encode(tokenizer, examples: Sequence[D.Example], rows: Sequence[int], max_len: int,
           add_eos: bool) -> List[Encoded]:
    """Prompt and target tokenised separately (so the target tokens are exactly the target's), the prompt cut
    from the left when prompt + target exceed ``max_len``; ``add_eos`` appends the EOS token to the target."""
    if not examples:
        return []
    p_ids = tokenizer([ex.input for ex in examples], add_special_tokens=False)["input_ids"]
    t_ids = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for ex, p, t, r in zip(examples, p_ids, t_ids, rows):
        t = list(t) + ([eos] if add_eos and eos is not None else [])
        t = t[: max(1, max_len - 1)]
        p = list(p)[-max(1, max_len - len(t)):]
        out.append(Encoded(p + t, len(p), int(r)))
    return out


def collate(items: Sequence[Encoded], pad_id: int, prompt_only: bool = False):
    """Right-padded ``input_ids`` / ``attention_mask`` [B, L], ``labels`` [B, L] (-100 except target tokens),
    ``rows`` [B]. ``prompt_only`` keeps just the prompts (for scoring the next token)."""
    seqs = [it.ids[: it.n_prompt] if prompt_only else it.ids for it in items]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, it) in enumerate(zip(seqs, items)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        if not prompt_only:
            labels[i, it.n_prompt: len(s)] = torch.tensor(s[it.n_prompt:])
    return ids, mask, labels, torch.tensor([it.row for it in items], dtype=torch.long)



def step_seed(seed: int, stage: str, step: int) -> int:
    """A seed that depends only on (seed, stage, step): batches and any randomness of a step are the same
    whether the run went straight through or resumed from a checkpoint."""
    return (seed * 1_000_003 + STAGES.index(stage) * 100_003 + step) % (2 ** 31)

