"""Rating targets as tokens of a tokenizer."""
from __future__ import annotations

from typing import List, Sequence

from .schema import RATINGS

# ------------------------------------------------------------------------------------------ tokens
def rating_token_ids(tokenizer, ratings: Sequence[str] = RATINGS, prompt: str = "score: ") -> List[int]:
    """Token ids of the rating targets ``"1"`` .. ``"5"`` as they follow a prompt, in ``tokenizer``'s vocabulary.

    Each rating must encode to exactly one token (true of SmolLM2/Llama-style tokenizers, where digits are
    single tokens) and the ids must be distinct; otherwise ``ValueError``. The ids are found by encoding the
    target alone, the way training encodes prompt and target separately, and checked against encoding
    ``prompt + rating`` so a tokenizer that merges across the boundary is caught.
    """
    ids = []
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    for r in ratings:
        t = tokenizer.encode(r, add_special_tokens=False)
        if len(t) != 1:
            raise ValueError(f"rating {r!r} encodes to {len(t)} tokens {t} with this tokenizer; need exactly one")
        joint = tokenizer.encode(prompt + r, add_special_tokens=False)
        if joint != p_ids + t:
            raise ValueError(f"tokenizer merges the rating {r!r} with the prompt end {prompt!r}: "
                             f"{joint} != {p_ids} + {t}")
        ids.append(t[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"rating tokens are not distinct: {dict(zip(ratings, ids))}")
    return ids
