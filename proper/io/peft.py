"""Importing a peft LoRA adapter as one user's adapter (``proper.import_peft_adapter``)."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..state import get_state

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _read_peft(source, config) -> Tuple[Dict[str, Tensor], Dict[str, Any], str]:
    """(state dict, adapter config, where the config came from: for errors)."""
    if isinstance(source, Mapping):
        sd = dict(source)
        if config is None:
            raise ValueError("import_peft_adapter: a state dict needs config= (the adapter_config.json contents, a "
                             "path to it, or a peft LoraConfig) to know lora_alpha")
    else:
        p = Path(source)
        folder = p if p.is_dir() else p.parent
        if p.is_dir():
            cands = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
            p = next((c for c in cands if c.is_file()), None)
            if p is None:
                raise FileNotFoundError(f"import_peft_adapter: no adapter_model.safetensors or adapter_model.bin in "
                                        f"{folder}")
        elif not p.is_file():
            raise FileNotFoundError(f"import_peft_adapter: {source} is neither a peft adapter directory nor a file")
        try:
            sd = load_file(str(p)) if p.suffix == ".safetensors" else torch.load(str(p), map_location="cpu",
                                                                                   weights_only=True)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"import_peft_adapter: cannot read {p} (truncated or not a peft adapter?): {e}") from None
        if config is None:
            config = folder / "adapter_config.json"
    where = "config="
    if isinstance(config, (str, os.PathLike)):
        cp = Path(config)
        where = str(cp)
        if not cp.is_file():
            raise FileNotFoundError(f"import_peft_adapter: adapter config {cp} does not exist")
        try:
            config = json.loads(cp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"import_peft_adapter: {cp} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"import_peft_adapter: {cp} must hold a JSON object, got {type(config).__name__}")
    elif not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    return sd, dict(config), where


def _alpha(value, field: str, where: str) -> float:
    """A lora_alpha value: a finite number > 0 (a NaN, 0 or negative alpha gives NaN or sign-flipped outputs)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"import_peft_adapter: {where}: '{field}' must be a finite number > 0, got {value!r}")
    return float(value)


def _pattern_value(name: str, pattern: Mapping[str, Any], default):
    """peft's rank_pattern/alpha_pattern lookup: a key matches a module name ending in it (regex)."""
    for key, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return v
    return default


@torch.no_grad()
def import_peft_adapter(model: nn.Module, user_id: int, path_or_state_dict, *, config=None,
                        adapter_name: Optional[str] = None) -> Dict[str, int]:
    """Make a peft LoRA checkpoint user `user_id`'s adapter; returns {module: rank}.

    path_or_state_dict: a peft adapter directory (adapter_config.json + adapter_model.safetensors/.bin), the
    weights file itself, or a state dict (then `config=` gives lora_alpha & co). Each module keeps its own rank
    r <= cfg.user_rank (written into rows [:r], user_ranks = r: padded rows are never computed) and scale
    alpha / r (alpha / sqrt(r) with use_rslora; alpha_pattern honoured). Modules the adapter does not cover get
    rank 0 for this user. Raises ValueError on modules this model does not adapt, shape or rank mismatches,
    and peft features with no equivalent here (DoRA, LoRA bias, embedding LoRA).
    """
    state = get_state(model)
    U = state.cfg.num_users
    if isinstance(user_id, bool) or not isinstance(user_id, int) or not 0 <= user_id < U:
        raise ValueError(f"import_peft_adapter: argument 'user_id' must be an int in [0, {U}), got {user_id!r}")
    sd, pcfg, where = _read_peft(path_or_state_dict, config)
    if pcfg.get("use_dora"):
        raise ValueError("import_peft_adapter: DoRA adapters (use_dora=True) are not supported")
    if pcfg.get("lora_bias"):
        raise ValueError("import_peft_adapter: adapters with a LoRA bias (lora_bias=True) are not supported")
    alpha = pcfg.get("lora_alpha", pcfg.get("alpha"))
    if alpha is None:
        raise ValueError(f"import_peft_adapter: {where}: the adapter config has no 'lora_alpha'")
    alpha = _alpha(alpha, "lora_alpha", where)
    rslora = pcfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"import_peft_adapter: {where}: 'use_rslora' must be true or false, got {rslora!r}")
    for field in ("alpha_pattern", "rank_pattern"):
        if not isinstance(pcfg.get(field) or {}, Mapping):
            raise ValueError(f"import_peft_adapter: {where}: '{field}' must be an object, got {pcfg[field]!r}")

    pairs: Dict[str, Dict[str, Tensor]] = {}
    adapters = set()
    for k, t in sd.items():
        m = _PEFT_KEY.match(k)
        if m is None:
            raise ValueError(f"import_peft_adapter: unsupported key {k!r} (only lora_A / lora_B weights of linear "
                             f"layers are supported)")
        if m["adapter"]:
            adapters.add(m["adapter"])
            if adapter_name is not None and m["adapter"] != adapter_name:
                continue
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if adapter_name is None and len(adapters) > 1:
        raise ValueError(f"import_peft_adapter: the state dict holds several adapters {sorted(adapters)}; pick one "
                         f"with adapter_name=")
    if not pairs:
        raise ValueError("import_peft_adapter: no lora_A/lora_B weights found")

    layers = state.layers
    foreign = sorted(set(pairs) - set(layers))
    if foreign:
        raise ValueError(f"import_peft_adapter: the adapter has modules this model does not adapt: {foreign[:4]}"
                         f"{' ...' if len(foreign) > 4 else ''} ({len(foreign)} in all). Adapted modules look like "
                         f"{list(layers)[:3]}; add the adapter's targets to ProperConfig.target_modules")
    plan = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"import_peft_adapter: module {name!r} has lora_{''.join(ab)} but not both A and B")
        a, b, layer = ab["A"], ab["B"], layers[name]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise ValueError(f"import_peft_adapter: module {name!r}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} are not a [r, d_in] / [d_out, r] pair")
        if (a.shape[1], b.shape[0]) != (layer.in_features, layer.out_features):
            raise ValueError(f"import_peft_adapter: module {name!r}: the adapter is {a.shape[1]} -> {b.shape[0]}, "
                             f"the model's layer is {layer.in_features} -> {layer.out_features}")
        if r > state.cfg.user_rank:
            raise ValueError(f"import_peft_adapter: module {name!r} has rank {r} > user_rank "
                             f"{state.cfg.user_rank}; raise ProperConfig.user_rank")
        if r < 1:
            raise ValueError(f"import_peft_adapter: module {name!r} has rank {r}")
        a_val = _alpha(_pattern_value(name, pcfg.get("alpha_pattern"), alpha), f"alpha_pattern[{name!r}]", where)
        scale = a_val / math.sqrt(r) if rslora else a_val / r
        plan[name] = (a, b, r, scale)

    ranks = {}
    row = state.user_row(user_id, write=True)   # a paged model: the user's slot (paged in, written back later)
    for name, layer in layers.items():   # all checks passed: now write (all or nothing)
        layer.user_a[row].zero_()
        layer.user_b[row].zero_()
        if name in plan:
            a, b, r, scale = plan[name]
            layer.user_a[row, :r].copy_(a)
            layer.user_b[row, :, :r].copy_(b)
            layer.user_ranks[row] = r
            layer.user_scale[row] = scale
        else:
            layer.user_ranks[row] = 0
        ranks[name] = int(layer.user_ranks[row])
    return ranks
