"""The per-batch user context, ``with proper.users(model, user_ids): ...``, and the per-batch token layout.

The ids live in a ContextVar holding {model state id: UserBatch}: each thread (and asyncio task) sees only the
contexts it entered itself, nested contexts for different models coexist, and leaving a block (normally or by
an exception) restores exactly what was there before. Ids are validated once on entry (one host sync), so the
layers call routed_lora with check_values=False.

A :class:`UserBatch` owns the batch's token metadata: per-token ids and the token -> user layout
(``proper_kernels.token_layout``: tokens sorted by user, segment starts and lengths). It is built once per
(rows, tokens per row, device) and handed to every adapted layer's ``routed_lora(layout=...)``, forward and
backward, instead of each of the ~200 layer calls of a forward sorting the same ids again.

Layers derive per-token ids from the batch dimension of their own input, so the same context serves a full
forward, the prefill and every KV-cache decode step of ``model.generate`` (whose sequence length changes), and
the expanded batch of num_return_sequences / beams (each id repeated, as generate repeats the rows).

The LoRA-aware router's inference switch (:func:`lora_router_off`) is a context variable too: per thread, never
written into the config, so saving inside the block saves the model as it is outside it.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
from typing import Dict, FrozenSet, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from proper_kernels import TokenLayout, token_layout

from .state import ProperState, get_state

_ACTIVE: contextvars.ContextVar[Optional[Dict[int, "UserBatch"]]] = contextvars.ContextVar("proper_users",
                                                                                            default=None)
_ROUTER_OFF: contextvars.ContextVar[FrozenSet[int]] = contextvars.ContextVar("proper_lora_router_off",
                                                                             default=frozenset())

#: Token shapes kept per context (and per layer for routing expansions). generate(use_cache=False) sees a new
#: sequence length every step, and every layer of a step shares one; the bound keeps a long generation from
#: growing the caches with its length (LRU: the current step's shape is always the most recent).
SHAPE_ENTRIES = 8
#: Per-layer routing entries kept per context: one per (layer, stage, router switch, rows), so large enough for
#: every layer of a big model under a few settings at once.
ROUTING_ENTRIES = 4096


class MissingUsersError(RuntimeError):
    """A stage that routes per user ran without a ``proper.users(model, user_ids)`` context."""


class BoundedCache(collections.OrderedDict):
    """A small LRU dict: at most ``maxsize`` entries, the least recently used dropped first."""

    def __init__(self, maxsize: int = SHAPE_ENTRIES):
        super().__init__()
        self.maxsize = maxsize

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


class TokenBatch:
    """The token metadata of one forward shape: per-token ids [T] and their layout over the user table."""

    __slots__ = ("ids", "layout")

    def __init__(self, ids: Tensor, layout: Optional[TokenLayout]):
        self.ids = ids
        self.layout = layout


class UserBatch:
    """Validated user ids of one context, plus the caches that live as long as the context.

    ``ids`` are *table rows*: the user ids themselves, or their slots in a paged model."""

    def __init__(self, ids: Tensor, lo: int, hi: int, num_users: int):
        self.ids = ids                                   # [B] int64 table rows, in [-1, U); lo / hi: min / max
        self.num_users = num_users                       # rows of the user table (the layout's U)
        self.has_unknown = lo < 0                        # some sequence has no user (cold start)
        self.has_known = hi >= 0                         # some sequence has a user adapter
        self.cache = BoundedCache(ROUTING_ENTRIES)       # per-layer routing under no_grad (modules/linear.py)
        self.prepared = BoundedCache(ROUTING_ENTRIES)    # per-layer prepared routed_lora calls under no_grad
        self._rows = BoundedCache()
        self._tokens = BoundedCache()
        self._covers: Optional[bool] = None

    @property
    def covers_table(self) -> bool:
        """Whether every row of the user table is one of this batch's ids (e.g. a batch of all users, or of as many
        users as a paged model has slots): per-user work may then run over the whole table and pick rows from the
        small results, which spares gathering copies of the big per-user tensors and the full-table zeros of the
        gather's backward. Computed once per batch."""
        if self._covers is None:
            self._covers = bool(self.has_known and not self.has_unknown and self.ids.numel() >= self.num_users
                                and torch.unique(self.ids).numel() == self.num_users)
        return self._covers

    def __len__(self) -> int:
        return self.ids.shape[0]

    def sample_ids(self, nb: int, device) -> Tensor:
        """Ids of the nb rows of a forward: the B ids, each repeated nb / B times (generate's expansion)."""
        key = (nb, device)
        t = self._rows.get(key)
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
            self._rows[key] = t
        return t

    def tokens(self, nb: int, per: int, device) -> TokenBatch:
        """Per-token ids [nb * per] (each row's id broadcast to its `per` tokens) and their token layout, built
        once for this shape and shared by every layer."""
        key = (nb, per, device)
        tb = self._tokens.get(key)
        if tb is None:
            s = self.sample_ids(nb, device)
            with torch.inference_mode(False):
                ids = s[:, None].expand(nb, per).reshape(nb * per)
                lay = token_layout(ids, self.num_users) if self.has_known else None
            tb = self._tokens[key] = TokenBatch(ids, lay)
        return tb


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


def check_user_ids(state: ProperState, user_ids) -> Tensor:
    """``user_ids`` as a validated [B] int64 tensor on the model's device (user ids, not table rows)."""
    return _as_ids(user_ids, state.cfg.num_users, state.device)[0]


def make_batch(state: ProperState, user_ids, *, pin: bool = False) -> UserBatch:
    """A validated UserBatch of ``user_ids`` for the model whose ProperState is ``state``. A paged model pages
    the users in and the batch holds their slots (``pin``: pinned until :func:`release_batch`)."""
    U = state.cfg.num_users
    ids, lo, hi = _as_ids(user_ids, U, state.device)
    if state.slots is None:
        return UserBatch(ids, lo, hi, U)
    rows = state.slots.rows(ids.tolist(), pin=pin)
    with torch.inference_mode(False):
        t = torch.tensor(rows, dtype=torch.int64, device=ids.device)
    known = [r for r in rows if r >= 0]
    return UserBatch(t, -1 if lo < 0 else min(known), max(known) if known else -1, state.cfg.table_rows)


def release_batch(state: ProperState, batch: UserBatch) -> None:
    """Unpin the slots of a batch made with ``make_batch(..., pin=True)``."""
    if state.slots is not None:
        state.slots.unpin(batch.ids.tolist())


@contextlib.contextmanager
def users(model, user_ids: Union[Tensor, Sequence[int]]) -> Iterator[UserBatch]:
    """Set the user of every sequence for each forward inside the block (model(...), generate, training steps).

    user_ids: [B] ints, one per sequence of the batch, -1 = no user (no user adapter; population-average gates).
    A paged model (``ProperConfig(resident_users=S)``) pages the batch's users into its slots here and pins them
    for the block; a block entered with gradients on also holds them until the optimizer's next step.
    """
    state = get_state(model)
    batch = make_batch(state, user_ids, pin=True)
    if state.slots is not None and torch.is_grad_enabled():   # a training step: keep the slots until it steps
        state.slots.hold(batch.ids.tolist())
    active = dict(_ACTIVE.get() or {})
    active[id(state)] = batch
    token = _ACTIVE.set(active)
    try:
        yield batch
    finally:
        _ACTIVE.reset(token)
        release_batch(state, batch)


@contextlib.contextmanager
def lora_router_off(state: ProperState) -> Iterator[None]:
    """The LoRA-aware router of ``state``'s model is off inside the block, in this thread/task only."""
    token = _ROUTER_OFF.set(_ROUTER_OFF.get() | {id(state)})
    try:
        yield
    finally:
        _ROUTER_OFF.reset(token)


def lora_router_active(state: ProperState) -> bool:
    """cfg.lora_router, unless a :func:`lora_router_off` block of this thread/task switched it off."""
    return state.cfg.lora_router and id(state) not in _ROUTER_OFF.get()


def checkpoint_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): the recomputation in backward runs inside
    the users contexts (and router switches) that were active when the segment ran forward (the ``users()`` block
    has usually been left by the time ``loss.backward()`` runs). Captured per segment, so gradient accumulation
    over several batches recomputes each with its own users. Use through :func:`gradient_checkpointing_kwargs`."""
    captured = (_ACTIVE.get(), _ROUTER_OFF.get())

    @contextlib.contextmanager
    def recompute():
        tokens = (_ACTIVE.set(captured[0]), _ROUTER_OFF.set(captured[1]))
        try:
            yield
        finally:
            _ROUTER_OFF.reset(tokens[1])
            _ACTIVE.reset(tokens[0])

    return contextlib.nullcontext(), recompute()


def gradient_checkpointing_kwargs() -> dict:
    """For Hugging Face models: ``model.gradient_checkpointing_enable(
    gradient_checkpointing_kwargs=proper.gradient_checkpointing_kwargs())``."""
    return {"use_reentrant": False, "context_fn": checkpoint_context_fn}


def active_batch(state: ProperState) -> Optional[UserBatch]:
    """The UserBatch of `state`'s model in this thread/context, or None."""
    active = _ACTIVE.get()
    return None if active is None else active.get(id(state))


def current_batch(state: ProperState, where: str = "") -> UserBatch:
    batch = active_batch(state)
    if batch is None:
        raise MissingUsersError(
            f"proper: stage {state.stage!r} routes per user, but {where or 'a ProperLinear'} ran outside a "
            f"users context. Wrap the forward/generate/training step in `with proper.users(model, user_ids):` "
            f"(user_ids: one id per sequence, -1 = none), or use set_stage(model, 'population'). With gradient "
            f"checkpointing, enable it with gradient_checkpointing_kwargs=proper.gradient_checkpointing_kwargs() "
            f"so the recomputation in backward sees the users.")
    return batch
