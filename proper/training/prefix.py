"""The frozen prefix of the decoder, run once per scored sequence.

A run adapts only its top decoder layers (``--lora-layers``, 10 of SmolLM2's 30 by default). The layers below
the lowest adapted one hold no adapter and are frozen in every stage, so an example's hidden state at the first
adapted layer is the same for every system a run scores (base, population, group, proper, the ablations) and at
every dev evaluation. Scoring is where a run spends much of its time (a test pass per system, a dev pass every
``eval_every`` steps, the per-user selection passes); with the prefix cached, those passes run only the top layers.

Scoring only (no gradients): a training step draws each example about once a run, so caching its prefix would
save little, and the training path stays exactly what it was. The cached states are those of the sequence's
first scoring batch; a later pass reads them back, so every pass of a run sees the same prefix values (a
resumed run too: its passes score the same lists in the same batches). Against running all the layers per batch
the difference is the float rounding of the prefix's matrix products at another batch length (checked on the
first use: a model whose decoder does not start from ``inputs_embeds`` as given, or whose prefix does not
reproduce the full forward, turns the cache off with a warning).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..modules.linear import ProperLinear

log = logging.getLogger("proper.train")

#: Above this many bytes of cached states a run stops adding to the cache (it keeps what it has).
MAX_BYTES = 6 * 2 ** 30
#: The first use compares the cached path with the full forward on its batch: the largest difference allowed,
#: relative to the largest hidden-state magnitude (the prefix at another batch length rounds differently; fp32).
CHECK_RTOL = 1e-4


@contextlib.contextmanager
def _decoder_layers(dec: nn.Module, layers: nn.ModuleList, norm: Optional[nn.Module] = None):
    """Run ``dec`` with only ``layers`` (and ``norm`` in place of its final norm) for the duration."""
    old_layers, old_norm = dec.layers, dec.norm
    dec.layers = layers
    if norm is not None:
        dec.norm = norm
    try:
        yield
    finally:
        dec.layers, dec.norm = old_layers, old_norm


def first_adapted_layer(model) -> int:
    """Index of the lowest decoder layer holding a ProperLinear (the number of layers when none does)."""
    layers = model.get_decoder().layers
    for i, layer in enumerate(layers):
        if any(isinstance(m, ProperLinear) for m in layer.modules()):
            return i
    return len(layers)


class FrozenPrefix:
    """Hidden states after the decoder's unadapted bottom layers, cached per token sequence (see the module
    docstring). ``hidden_states(ids, mask)`` is the decoder's last hidden state, as ``model.get_decoder()(...)``
    gives it, for right-padded batches."""

    def __init__(self, model, split: int, max_bytes: int = MAX_BYTES, share: Optional["FrozenPrefix"] = None):
        dec = model.get_decoder()
        if not 0 < split < len(dec.layers):
            raise ValueError(f"FrozenPrefix: split must be in [1, {len(dec.layers) - 1}], got {split}")
        if share is not None and share.split != split:
            raise ValueError(f"FrozenPrefix: share= splits at layer {share.split}, this model at {split}")
        self.model, self.split, self.max_bytes = model, split, max_bytes
        self.bottom = dec.layers[:split]   # a ModuleList of the same modules
        self.top = dec.layers[split:]
        # share: another model with the same frozen bottom (an ablation's copy of the base) reads and adds to the
        # same states
        self.states: Dict[Tuple[int, ...], torch.Tensor] = {} if share is None else share.states
        self.checked = False
        self.enabled = True

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    @classmethod
    def for_model(cls, model, max_bytes: int = MAX_BYTES,
                  share: Optional["FrozenPrefix"] = None) -> Optional["FrozenPrefix"]:
        """A prefix cache for a patched Llama-style model, or None where there is nothing to cache (an adapter in
        the first layer) or the bottom could differ between passes (dropout in it). ``share``: the cache of a
        model with the same base weights, whose states this one reuses (None where the splits differ)."""
        dec = model.get_decoder()
        if not all(hasattr(dec, a) for a in ("layers", "norm", "embed_tokens")):
            return None
        split = first_adapted_layer(model)
        if split == 0 or split >= len(dec.layers):
            return None
        if getattr(model.config, "attention_dropout", 0.0) or any(
                isinstance(m, nn.Dropout) and m.p > 0 for m in dec.layers[:split].modules()):
            return None
        if share is not None and share.split != split:
            share = None
        return cls(model, split, max_bytes, share)

    def _frozen(self) -> bool:
        dec = self.model.get_decoder()
        params = list(self.bottom.parameters()) + list(dec.embed_tokens.parameters())
        return not any(p.requires_grad for p in params)

    @torch.no_grad()
    def _bottom(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dec = self.model.get_decoder()
        with _decoder_layers(dec, self.bottom, nn.Identity()):
            return dec(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def _top(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dec = self.model.get_decoder()
        with _decoder_layers(dec, self.top):
            return dec(inputs_embeds=h, attention_mask=mask, use_cache=False).last_hidden_state

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states [B, L, d] of right-padded ``ids`` / ``mask`` (scoring: no gradients)."""
        if not self.usable():
            raise RuntimeError("FrozenPrefix.hidden_states: scoring only (no_grad, the cache on, frozen bottom layers)")
        with torch.no_grad():
            return self._hidden_states(ids, mask)

    def _hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lens = mask.sum(1).tolist()
        keys = [tuple(ids[i, :n].tolist()) for i, n in enumerate(lens)]
        missing = [i for i, k in enumerate(keys) if k not in self.states]
        fresh: Dict[int, torch.Tensor] = {}
        if missing:
            L = max(lens[i] for i in missing)
            hb = self._bottom(ids[missing, :L], mask[missing, :L])
            for j, i in enumerate(missing):
                fresh[i] = hb[j, :lens[i]].clone()
        emb = self.model.get_decoder().embed_tokens.weight
        h = torch.zeros(ids.shape[0], ids.shape[1], emb.shape[1], dtype=emb.dtype, device=emb.device)
        for i, k in enumerate(keys):
            h[i, :lens[i]] = fresh[i] if i in fresh else self.states[k]
        out = self._top(h, mask)
        if not self.checked:
            self.checked = True
            full = self.model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            real = mask.bool()
            err = float((out[real] - full[real]).abs().max())
            scale = float(full[real].abs().max().clamp_min(1e-30))
            if not err <= CHECK_RTOL * scale:
                log.warning("prefix cache off: its hidden states differ from the full forward by %.3g (scale %.3g); "
                            "every pass runs all the layers", err, scale)
                self.enabled = False
                return full
        room = self.max_bytes - self.bytes
        for i in missing:
            room -= fresh[i].numel() * fresh[i].element_size()
            if room < 0:
                break
            self.states[keys[i]] = fresh[i]
        return out

    def usable(self) -> bool:
        """Whether this call may read the cache: scoring (no gradients), the cache on, the bottom still frozen."""
        return self.enabled and not torch.is_grad_enabled() and self._frozen()
