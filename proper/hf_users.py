"""Users for callers that only run ``model(**batch)``: HF ``Trainer``, TRL, accelerate loops, ``pipeline``.

    logits = model(input_ids=ids, user_ids=uids).logits     # the keyword form of proper.users(model, uids)
    out = model.generate(**enc, user_ids=uids)
    trainer = Trainer(model, args, train_dataset=rows, data_collator=proper.UserIdCollator())

``install_user_ids_keyword`` (called by apply_proper) gives one model instance ``forward`` / ``generate`` wrappers
that pop ``user_ids`` and run the call inside ``proper.users(model, user_ids)``: the same per-batch context, so
both forms give identical results, and generate's expanded batch (num_return_sequences, beams) is handled by the
context as before. The wrappers are small picklable objects stored on the instance (no class is patched); they
hold the model itself, so ``copy.deepcopy(model)`` gives a copy whose wrappers call the copy.

Trainer keeps only the batch columns that ``inspect.signature(model.forward)`` names, so the wrapper's signature
is the original one plus ``user_ids``: a per-example ``user_ids`` column survives ``remove_unused_columns``
(a ``user_id`` column would be dropped before any collator sees it).
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import context as _users
from .state import get_state

KEYWORD = "user_ids"
_WRAPPED = ("forward", "generate")


def _show(ids: torch.Tensor, limit: int = 8) -> str:
    vals = ids.tolist()
    return str(vals) if len(vals) <= limit else f"{vals[:limit]} ... ({len(vals)} ids)"


class _UserIdsKeyword:
    """``model.<name>`` with a ``user_ids=`` keyword. ``inner`` is the instance-level callable it replaced (e.g. an
    accelerate hook), or None for the class's own method, looked up at call time (nothing bound is stored, so
    deepcopy and pickle see only the model and plain values)."""

    def __init__(self, model, name: str, inner: Optional[Callable]):
        self.model = model
        self.name = name
        self.inner = inner

    @property
    def __signature__(self) -> inspect.Signature:
        """What inspect.signature (and so Trainer's remove_unused_columns) sees: the target's plus user_ids."""
        return _with_keyword(inspect.signature(self._target()))

    def _target(self) -> Callable:
        if self.inner is not None:
            return self.inner
        return getattr(type(self.model), self.name).__get__(self.model)

    def _call(self, args, kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        # the class's function with the model passed explicitly: a bound method here would be rebuilt by
        # torch.compile's graph-break resume as `model.forward`, i.e. this wrapper (endless recursion)
        return getattr(type(self.model), self.name)(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        user_ids = kwargs.pop(KEYWORD, None)
        if user_ids is None:          # no keyword: whatever context is active applies (or MissingUsersError)
            return self._call(args, kwargs)
        state = get_state(self.model)
        active = _users.active_batch(state)
        if active is None:
            with _users.users(self.model, user_ids):
                return self._call(args, kwargs)
        given = _users.make_batch(state, user_ids).ids
        if given.shape != active.ids.shape or not torch.equal(given, active.ids):
            raise ValueError(f"model.{self.name}: argument 'user_ids' {_show(given)} disagrees with the ids of the "
                             f"enclosing proper.users(model, ...) block {_show(active.ids)}; pass the ids one way, "
                             f"or the same ids both ways")
        return self._call(args, kwargs)


def _with_keyword(sig: inspect.Signature) -> inspect.Signature:
    """``sig`` plus a keyword-only ``user_ids=None`` (before any ``**kwargs``, where Python requires it)."""
    params = [p for p in sig.parameters.values() if p.name != KEYWORD]
    new = inspect.Parameter(KEYWORD, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:at] + [new] + params[at:])


def install_user_ids_keyword(model) -> None:
    """Give this instance's ``forward`` (and ``generate``, when it has one) a ``user_ids=`` keyword: [B] ints, one
    per sequence, -1 = no user; the call then runs inside ``proper.users(model, user_ids)``. Passing ids while a
    ``proper.users`` block for this model is active is allowed only when they are the same ids (else ValueError).
    Idempotent; no class is modified. apply_proper calls it on every patched model."""
    for name in _WRAPPED:
        if not callable(getattr(model, name, None)):
            continue
        current = model.__dict__.get(name)
        if isinstance(current, _UserIdsKeyword):
            if current.model is model:
                continue
            current = current.inner     # another model's wrapper (a shallow copy's): wrap what it wrapped
        # object.__setattr__: a plain instance attribute, whatever nn.Module.__setattr__ would make of it
        object.__setattr__(model, name, _UserIdsKeyword(model, name, current))


def _pad(rows: List[Any], value: int) -> torch.Tensor:
    rows = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    out = torch.full((len(rows), max(r.numel() for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def pad_features(features: Sequence[Dict[str, Any]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-pad per-example ``input_ids`` (pad_token_id), ``attention_mask`` (0; built from the lengths when
    absent) and ``labels`` (-100, so padding is never scored) into [B, L] tensors; other keys are stacked."""
    keys = features[0].keys()
    batch = {k: _pad([f[k] for f in features], {"labels": -100, "attention_mask": 0}.get(k, pad_token_id))
             for k in ("input_ids", "attention_mask", "labels") if k in keys}
    if "input_ids" in batch and "attention_mask" not in batch:
        batch["attention_mask"] = _pad([[1] * len(f["input_ids"]) for f in features], 0)
    for k in keys:
        if k not in batch:
            batch[k] = torch.stack([torch.as_tensor(f[k]) for f in features])
    return batch


class UserIdCollator:
    """A data collator that carries each example's user id through to the batch's ``user_ids`` (LongTensor [B]).

    Pops ``column`` from every example (a copy: the data set is untouched), collates the rest with
    ``base_collator`` (any HF collator, e.g. ``DataCollatorForSeq2Seq(tokenizer)``; default :func:`pad_features`
    with ``pad_token_id``) and adds ``user_ids``. Keep the default column name ``"user_ids"`` under HF ``Trainer``:
    it drops columns the forward signature does not name. Standard collators that go through ``tokenizer.pad``
    (DataCollatorForSeq2Seq, DataCollatorForLanguageModeling, DataCollatorWithPadding) also carry a scalar
    ``user_ids`` column through on their own; this one adds the check and works without a tokenizer.
    """

    def __init__(self, base_collator: Optional[Callable] = None, column: str = KEYWORD, pad_token_id: int = 0):
        if base_collator is not None and not callable(base_collator):
            raise TypeError(f"UserIdCollator: argument 'base_collator' must be callable (a data collator) or None, "
                            f"got {type(base_collator).__name__}")
        if not isinstance(column, str) or not column:
            raise TypeError(f"UserIdCollator: argument 'column' must be a non-empty str, got {column!r}")
        self.base_collator = base_collator
        self.column = column
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        if not features:
            raise ValueError("UserIdCollator: got an empty list of examples")
        rest, ids = [], []
        for i, f in enumerate(features):
            if self.column not in f:
                raise KeyError(f"UserIdCollator: example {i} has no {self.column!r} column (its keys: "
                               f"{sorted(f)}); give every example its user id (-1 = no user)")
            f = dict(f)
            u = f.pop(self.column)
            try:
                if isinstance(u, bool) or (isinstance(u, torch.Tensor) and u.numel() != 1):
                    raise TypeError
                ids.append(operator.index(u.item() if isinstance(u, torch.Tensor) else u))
            except TypeError:
                raise TypeError(f"UserIdCollator: example {i}'s {self.column!r} must be an int (-1 = no user), "
                                f"got {u!r}") from None
            rest.append(f)
        batch = self.base_collator(rest) if self.base_collator is not None else pad_features(rest, self.pad_token_id)
        batch[KEYWORD] = torch.tensor(ids, dtype=torch.long)
        return batch
