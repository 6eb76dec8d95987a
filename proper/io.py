"""Saving and loading PROPER weights (safetensors, atomic) and importing peft LoRA adapters as users.

Layout of a saved directory:
    proper_model.safetensors   every PROPER tensor (not the base model), keyed "<module>.<tensor>"; its
                               metadata holds the format tag, the config and a save id
    proper_config.json         the same config, the stage and the save id, for people and tools
Each file is written to a temporary file in the same directory and renamed over the old one (os.replace is
atomic), so a crash or an error mid-save leaves the previous save intact. The save id ties the pair together:
a json and weights from different saves are refused.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ProperConfig
from .patch import _STATE_ATTR, apply_proper, get_state, set_stage

WEIGHTS_NAME = "proper_model.safetensors"
CONFIG_NAME = "proper_config.json"
FORMAT = "proper"
FORMAT_VERSION = 1
_BASE_KEYS = ("weight", "bias")   # the wrapped base layer's own tensors: not ours to save


# -------------------------------------------------------------------------------------------- atomic files
def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Run write(tmp) on a temp file beside `path`, fsync it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def proper_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """Every PROPER tensor of the model (parameters and buffers, base weights excluded), by "<module>.<name>"."""
    out = {}
    for name, layer in get_state(model).layers.items():
        for k, t in layer.state_dict(keep_vars=False).items():
            if k not in _BASE_KEYS:
                out[f"{name}.{k}"] = t
    return out


def save_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Save the PROPER weights and config of `model` into directory `path` (created if needed); returns it."""
    state = get_state(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "save_id": save_id, "config": state.cfg.to_dict(),
            "stage": state.stage, "experts_initialized": state.experts_initialized,
            "modules": list(state.layers), "base_model": type(model).__name__}
    tensors = {k: t.detach().contiguous() for k, t in proper_state_dict(model).items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "save_id": save_id,
            "proper_config": json.dumps(info["config"], sort_keys=True)}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2, sort_keys=True)))
    return path


def read_saved(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """(config json, tensors) of a save, with clear errors for missing, truncated, foreign or mixed files."""
    path = Path(path)
    wfile, cfile = path / WEIGHTS_NAME, path / CONFIG_NAME
    for f in (wfile, cfile):
        if not f.is_file():
            raise FileNotFoundError(f"proper.from_pretrained: {f} does not exist (expected a directory written by "
                                    f"proper.save_pretrained, with {WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        info = json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"proper.from_pretrained: {cfile} is not valid JSON (truncated or not ours?): {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"proper.from_pretrained: {cfile} is not a PROPER config (no \"format\": \"{FORMAT}\")")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"proper.from_pretrained: {cfile} has format_version {info.get('format_version')}, newer "
                         f"than this library's {FORMAT_VERSION}")
    try:
        with safe_open(str(wfile), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"proper.from_pretrained: {wfile} is not a readable safetensors file (truncated or "
                         f"corrupt?): {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"proper.from_pretrained: {wfile} is a safetensors file but not a PROPER save (metadata "
                         f"{dict(list(meta.items())[:4])}); was it written by proper.save_pretrained?")
    if meta.get("save_id") != info.get("save_id"):
        raise ValueError(f"proper.from_pretrained: {wfile} and {cfile} come from different saves "
                         f"(save ids {meta.get('save_id')} vs {info.get('save_id')})")
    return info, tensors


@torch.no_grad()
def load_proper_weights(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy saved PROPER tensors into a patched model; every key must match in name and shape."""
    targets = {}
    for name, layer in get_state(model).layers.items():
        for k, t in layer.state_dict(keep_vars=True).items():
            if k not in _BASE_KEYS:
                targets[f"{name}.{k}"] = t
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(f"proper: saved weights do not match this model's PROPER layers: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    for k, dst in targets.items():
        src = tensors[k]
        if src.shape != dst.shape:
            raise ValueError(f"proper: saved tensor {k!r} has shape {tuple(src.shape)}, the model expects "
                             f"{tuple(dst.shape)}")
        dst.copy_(src)


def from_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Patch `model` (a fresh base model, or one already patched with the same config) and load a save."""
    info, tensors = read_saved(path)
    cfg = ProperConfig.from_dict(info["config"])
    if getattr(model, _STATE_ATTR, None) is None:
        apply_proper(model, cfg)
    elif get_state(model).cfg != cfg:
        raise ValueError(f"proper.from_pretrained: the model is already patched with a different config "
                         f"({get_state(model).cfg}) than the save ({cfg})")
    state = get_state(model)
    load_proper_weights(model, tensors)
    set_stage(model, info.get("stage", "user"), init_experts=False)
    state.experts_initialized = bool(info.get("experts_initialized", False))
    return model


# ----------------------------------------------------------------------------------------------- peft import
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _read_peft(source, config) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
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
    if isinstance(config, (str, os.PathLike)):
        cp = Path(config)
        if not cp.is_file():
            raise FileNotFoundError(f"import_peft_adapter: adapter config {cp} does not exist")
        config = json.loads(cp.read_text())
    elif not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    return sd, dict(config)


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
    sd, pcfg = _read_peft(path_or_state_dict, config)
    if pcfg.get("use_dora"):
        raise ValueError("import_peft_adapter: DoRA adapters (use_dora=True) are not supported")
    if pcfg.get("lora_bias"):
        raise ValueError("import_peft_adapter: adapters with a LoRA bias (lora_bias=True) are not supported")
    alpha = pcfg.get("lora_alpha", pcfg.get("alpha"))
    if alpha is None:
        raise ValueError("import_peft_adapter: the adapter config has no 'lora_alpha'")
    rslora = bool(pcfg.get("use_rslora", False))

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
        a_val = float(_pattern_value(name, pcfg.get("alpha_pattern"), alpha))
        scale = a_val / math.sqrt(r) if rslora else a_val / r
        plan[name] = (a, b, r, scale)

    ranks = {}
    for name, layer in layers.items():   # all checks passed: now write (all or nothing)
        layer.user_a[user_id].zero_()
        layer.user_b[user_id].zero_()
        if name in plan:
            a, b, r, scale = plan[name]
            layer.user_a[user_id, :r].copy_(a)
            layer.user_b[user_id, :, :r].copy_(b)
            layer.user_ranks[user_id] = r
            layer.user_scale[user_id] = scale
        else:
            layer.user_ranks[user_id] = 0
        ranks[name] = int(layer.user_ranks[user_id])
    return ranks
