"""The base model a run trains: SmolLM2 from the pip-shipped GGUF, optionally truncated, and which of its
layers get LoRAs."""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence



from ..models import load_smollm2

def load_model(num_layers: Optional[int] = None):
    """(SmolLM2-135M-Instruct, tokenizer) from the pip-shipped GGUF (no hub); optionally truncated to the first
    ``num_layers`` decoder layers (a faster stand-in for tests)."""
    model, tok = load_smollm2()
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model, tok


def truncate_layers(model, n: int) -> None:
    """Keep the first ``n`` decoder layers of a Llama-style model (in place)."""
    dec = model.get_decoder()
    if not hasattr(dec, "layers") or n < 1 or n > len(dec.layers):
        raise ValueError(f"num_layers must be in [1, {len(getattr(dec, 'layers', []))}], got {n}")
    dec.layers = dec.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


def target_modules(model, names: Sequence[str], top_layers) -> Any:
    """``names`` as ProperConfig.target_modules, restricted to the top ``top_layers`` decoder layers (a regex,
    full match, e.g. ``(.*\\.)?layers\\.(20|...|29)\\.(.*\\.)?(gate_proj|up_proj|down_proj)``); all layers
    when ``top_layers`` is None, 0 or "all"."""
    if top_layers in (None, 0, "all"):
        return tuple(names)
    n = len(model.get_decoder().layers)
    k = int(top_layers)
    if k < 0:
        raise ValueError(f"--lora-layers must be >= 0 or 'all', got {top_layers!r}")
    idx = "|".join(str(i) for i in range(max(0, n - k), n))
    return rf"(.*\.)?layers\.({idx})\.(.*\.)?({'|'.join(re.escape(t) for t in names)})"


