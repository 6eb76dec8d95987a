"""The per-batch user context: ``with proper.users(model, user_ids): ...``.

The ids live in a ContextVar holding {model state id: UserBatch}: each thread (and asyncio task) sees only the
contexts it entered itself, nested contexts for different models coexist, and leaving a block (normally or by
an exception) restores exactly what was there before. Ids are validated once on entry (one host sync), so the
layers call routed_lora with check_values=False.

Layers derive per-token ids from the batch dimension of their own input, so the same context serves a full
forward, the prefill and every KV-cache decode step of ``model.generate`` (whose sequence length changes), and
the expanded batch of num_return_sequences / beams (each id repeated, as generate repeats the rows).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

_ACTIVE: contextvars.ContextVar[Optional[Dict[int, "UserBatch"]]] = contextvars.ContextVar("proper_users",
                                                                                            default=None)


class MissingUsersError(RuntimeError):
    """A stage that routes per user ran without a ``proper.users(model, user_ids)`` context."""


class UserBatch:
    """Validated user ids of one context, plus caches that live as long as the context."""

    def __init__(self, ids: Tensor, lo: int, hi: int):
        self.ids = ids                                   # [B] int64, in [-1, U); lo / hi: its min / max
        self.has_unknown = lo < 0                        # some sequence has no user (cold start)
        self.has_known = hi >= 0                         # some sequence has a user adapter
        self.cache: dict = {}                            # per-layer routing under no_grad (see layer.py)
        self._ids: dict = {}

    def __len__(self) -> int:
        return self.ids.shape[0]

    def sample_ids(self, nb: int, device) -> Tensor:
        """Ids of the nb rows of a forward: the B ids, each repeated nb / B times (generate's expansion)."""
        key = ("s", nb, device)
        t = self._ids.get(key)
        if t is None:
            B = self.ids.shape[0]
            if nb != B and (nb % B or nb < B):
                raise ValueError(f"proper.users: the context holds {B} user ids but a forward got batch size {nb}; "
                                 f"give one user id per sequence (or a batch that repeats each sequence "
                                 f"the same number of times, as generate does)")
            with torch.inference_mode(False):   # normal tensors: they may be saved for backward
                t = self.ids.to(device)
                if nb != B:
                    t = t.repeat_interleave(nb // B)
            self._ids[key] = t
        return t

    def token_ids(self, nb: int, per: int, device) -> Tensor:
        """Per-token ids [nb * per]: each row's id broadcast to its `per` tokens."""
        key = ("t", nb, per, device)
        t = self._ids.get(key)
        if t is None:
            s = self.sample_ids(nb, device)
            with torch.inference_mode(False):
                t = s[:, None].expand(nb, per).reshape(nb * per)
            self._ids[key] = t
        return t


def _as_ids(user_ids, num_users: int, device) -> Tuple[Tensor, int, int]:
    """user_ids as a validated [B] int64 tensor on ``device``, with its min and max (one host sync)."""
    if isinstance(user_ids, Tensor):
        t = user_ids
    else:
        try:
            t = torch.as_tensor(user_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"proper.users: argument 'user_ids' must be a 1-D integer tensor or a sequence of ints, "
                            f"got {type(user_ids).__name__} ({e})") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"proper.users: argument 'user_ids' must be a non-empty 1-D tensor [B] (one id per sequence), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"proper.users: argument 'user_ids' must hold integers, got dtype {t.dtype}")
    with torch.inference_mode(False):
        t = t.to(device=device, dtype=torch.int64)
    lo, hi = (int(v) for v in torch.stack([t.min(), t.max()]).tolist())
    if lo < -1 or hi >= num_users:
        bad = lo if lo < -1 else hi
        raise ValueError(f"proper.users: argument 'user_ids' must be in [-1, {num_users}) (num_users = {num_users}; "
                         f"-1 = no user), got {bad}")
    return t, lo, hi


def make_batch(state, user_ids) -> UserBatch:
    """A validated UserBatch of ``user_ids`` for the model whose ProperState is ``state``."""
    device = next(iter(state.layers.values())).user_a.device
    return UserBatch(*_as_ids(user_ids, state.cfg.num_users, device))


@contextlib.contextmanager
def users(model, user_ids: Union[Tensor, Sequence[int]]) -> Iterator[UserBatch]:
    """Set the user of every sequence for each forward inside the block (model(...), generate, training steps).

    user_ids: [B] ints, one per sequence of the batch, -1 = no user (no user adapter; population-average gates).
    """
    from .patch import get_state   # here, not at import: patch imports layer imports this module

    state = get_state(model)
    batch = make_batch(state, user_ids)
    active = dict(_ACTIVE.get() or {})
    active[id(state)] = batch
    token = _ACTIVE.set(active)
    try:
        yield batch
    finally:
        _ACTIVE.reset(token)


def checkpoint_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): the recomputation in backward runs inside
    the users contexts that were active when the segment ran forward (the ``users()`` block has usually been
    left by the time ``loss.backward()`` runs). Captured per segment, so gradient accumulation over several
    batches recomputes each with its own users. Use through :func:`gradient_checkpointing_kwargs`."""
    captured = _ACTIVE.get()

    @contextlib.contextmanager
    def recompute():
        token = _ACTIVE.set(captured)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    return contextlib.nullcontext(), recompute()


def gradient_checkpointing_kwargs() -> dict:
    """For Hugging Face models: ``model.gradient_checkpointing_enable(
    gradient_checkpointing_kwargs=proper.gradient_checkpointing_kwargs())``."""
    return {"use_reentrant": False, "context_fn": checkpoint_context_fn}


def active_batch(state) -> Optional[UserBatch]:
    """The UserBatch of `state`'s model in this thread/context, or None."""
    active = _ACTIVE.get()
    return None if active is None else active.get(id(state))


def current_batch(state, where: str = "") -> UserBatch:
    batch = active_batch(state)
    if batch is None:
        raise MissingUsersError(
            f"proper: stage {state.stage!r} routes per user, but {where or 'a ProperLinear'} ran outside a "
            f"users context. Wrap the forward/generate/training step in `with proper.users(model, user_ids):` "
            f"(user_ids: one id per sequence, -1 = none), or use set_stage(model, 'population'). With gradient "
            f"checkpointing, enable it with gradient_checkpointing_kwargs=proper.gradient_checkpointing_kwargs() "
            f"so the recomputation in backward sees the users.")
    return batch
