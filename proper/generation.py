"""Batched multi-user generation: (user_id, prompt) pairs in, each user's text out, one generate call a batch."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch

from .context import users
from .state import get_state


@contextlib.contextmanager
def left_padding(tokenizer):
    """Left padding for the batch (decoder-only generation needs the prompt ends aligned); restored after."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad


def _format(tokenizer, prompt: str, chat: bool) -> str:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def generate_for_users(model, tokenizer, pairs: Sequence[Tuple[int, str]], *, max_new_tokens: int = 32,
                       do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       seed: Optional[int] = None, batch_size: Optional[int] = None, chat: bool = False,
                       **generate_kwargs) -> List[str]:
    """Generate for every (user_id, prompt) pair; returns the new text of each pair, in input order.

    Pairs are batched (batch_size at a time; all at once by default, at most resident_users at once for a paged
    model, so a batch's users fit its slots) with left padding, and each batch runs
    one model.generate inside proper.users(model, ids) (-1 = no user). Greedy by default; do_sample=True samples
    with temperature / top_p / top_k, reproducibly when `seed` is given (the global RNG is left untouched).
    chat=True wraps each prompt in the tokenizer's chat template.
    """
    pairs = list(pairs)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"generate_for_users: argument 'max_new_tokens' must be an int, got {max_new_tokens!r}")
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], str)):
            raise TypeError(f"generate_for_users: argument 'pairs' must hold (user_id: int, prompt: str) pairs; "
                            f"item {i} is {p!r}")
    if not pairs:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"generate_for_users: argument 'max_new_tokens' must be >= 1, got {max_new_tokens}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"generate_for_users: argument 'batch_size' must be None (all at once) or an int >= 1, "
                         f"got {batch_size!r}")
    slots = get_state(model).slots
    bs = batch_size or (len(pairs) if slots is None else min(len(pairs), slots.num_slots))
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    outs: List[str] = []
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
        else contextlib.nullcontext()
    with rng, left_padding(tokenizer) as tok, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        for s in range(0, len(pairs), bs):
            chunk = pairs[s:s + bs]
            enc = tok([_format(tok, p, chat) for _, p in chunk], return_tensors="pt", padding=True).to(device)
            with users(model, torch.tensor([u for u, _ in chunk])):
                gen = model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs += tok.batch_decode(new, skip_special_tokens=True)
    return outs
