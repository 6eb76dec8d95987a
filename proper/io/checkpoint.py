"""Saving and loading PROPER weights: safetensors, one atomic step per save, never a pickle.

Layout of a saved directory:
    proper_model.safetensors   every PROPER tensor (not the base model), keyed "<module>.<tensor>"; its metadata
                               holds the format tag and the whole save record (config, stage, save id, and the
                               id of the save it replaced)
    proper_config.json         the same record, for people and tools

Atomicity: the weights file is the commit point. A save writes it to a temp file and renames it over the old
one (os.replace is atomic), then rewrites the json the same way. A crash before the first rename leaves the
previous save whole; a crash between the two leaves complete new weights beside the previous json, which
:func:`read_saved` recognises (the weights name the json's save as the one they replaced) and loads as the new
save. Weights and a json of unrelated saves are refused. Temp files of a killed save are removed by the next
save. Runtime switches (``ProperConfig.backend``) are never written.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from ..config import ProperConfig
from ..patch import apply_proper, set_stage
from ..state import STAGES, find_state, get_state
from .atomic import atomic_write, atomic_write_text, remove_leftovers

log = logging.getLogger("proper.io")

WEIGHTS_NAME = "proper_model.safetensors"
CONFIG_NAME = "proper_config.json"
FORMAT = "proper"
FORMAT_VERSION = 1
_RECORD_KEYS = ("format", "format_version", "save_id", "config", "stage")   # required in every save record


def proper_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """Every PROPER tensor of the model (parameters and buffers, base weights excluded), by "<module>.<name>",
    part by part (ProperLinear.PARTS)."""
    return {f"{name}.{k}": t.detach() for name, layer in get_state(model).layers.items()
            for k, t in layer.adapter_tensors().items()}


def save_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Save the PROPER weights and config of `model` into directory `path` (created if needed); returns it.
    One atomic step: a crash at any point leaves `path` loadable as the previous save or as this one."""
    state = get_state(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path, (WEIGHTS_NAME, CONFIG_NAME))
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "save_id": uuid.uuid4().hex,
            "replaces": _current_save_id(path), "config": state.cfg.saved_dict(), "stage": state.stage,
            "experts_initialized": state.experts_initialized, "modules": list(state.layers),
            "base_model": type(model).__name__}
    tensors = {k: t.contiguous() for k, t in proper_state_dict(model).items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "save_id": info["save_id"],
            "record": json.dumps(info, sort_keys=True)}
    blob = safetensors_bytes(tensors, metadata=meta)   # serialised here: safetensors' own temp files never appear
    atomic_write(path / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(blob))   # the commit point
    atomic_write_text(path / CONFIG_NAME, json.dumps(info, indent=2, sort_keys=True))
    return path


def _current_save_id(path: Path):
    """The save id of the weights now in `path` (None if there are none or they cannot be read)."""
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            return (f.metadata() or {}).get("save_id")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _read_record(cfile: Path) -> Dict[str, Any]:
    try:
        info = json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"proper.from_pretrained: {cfile} is not valid JSON (truncated or not ours?): {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"proper.from_pretrained: {cfile} is not a PROPER config (no \"format\": \"{FORMAT}\")")
    return info


def _check_record(info: Dict[str, Any], where: Path) -> None:
    missing = [k for k in _RECORD_KEYS if k not in info]
    if missing:
        raise ValueError(f"proper.from_pretrained: {where} lacks the keys {missing} (a save record has "
                         f"{list(_RECORD_KEYS)})")
    v = info["format_version"]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= FORMAT_VERSION:
        raise ValueError(f"proper.from_pretrained: {where} has format_version {v!r}; this library reads "
                         f"format_version 1..{FORMAT_VERSION}")
    if info["stage"] not in STAGES:
        raise ValueError(f"proper.from_pretrained: {where} has stage {info['stage']!r}; expected one of {STAGES}")
    if not isinstance(info["config"], dict):
        raise ValueError(f"proper.from_pretrained: {where}: 'config' must be an object, got "
                         f"{type(info['config']).__name__}")


def read_saved(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """(save record, tensors) of a save, with clear errors for missing, truncated, foreign or mixed files."""
    path = Path(path)
    wfile, cfile = path / WEIGHTS_NAME, path / CONFIG_NAME
    for f in (wfile, cfile):
        if not f.is_file():
            raise FileNotFoundError(f"proper.from_pretrained: {f} does not exist (expected a directory written by "
                                    f"proper.save_pretrained, with {WEIGHTS_NAME} and {CONFIG_NAME})")
    info = _read_record(cfile)
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
        record = _weights_record(meta, wfile)
        if record is None or record.get("replaces") != info.get("save_id"):
            raise ValueError(f"proper.from_pretrained: {wfile} and {cfile} come from different saves "
                             f"(save ids {meta.get('save_id')} vs {info.get('save_id')})")
        log.warning("%s: the last save was interrupted after its weights were written; loading it from the "
                    "weights' own record (%s is the previous save's)", path, CONFIG_NAME)
        info, where = record, wfile
    else:
        where = cfile
    _check_record(info, where)
    return info, tensors


def _weights_record(meta: Dict[str, str], wfile: Path):
    try:
        record = json.loads(meta["record"])
    except (KeyError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("save_id") != meta.get("save_id"):
        raise ValueError(f"proper.from_pretrained: {wfile} has a damaged save record in its metadata")
    return record


@torch.no_grad()
def load_proper_weights(model: nn.Module, tensors: Mapping[str, Tensor], source: str = "saved weights") -> None:
    """Copy saved PROPER tensors into a patched model; every key must match in name and shape, and the per-user
    ranks and scales must be valid (``source`` names the file in errors)."""
    state = get_state(model)
    targets = {f"{name}.{k}": t for name, layer in state.layers.items() for k, t in layer.adapter_tensors().items()}
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(f"proper: {source} do not match this model's PROPER layers: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    for k, dst in targets.items():
        src = tensors[k]
        if src.shape != dst.shape:
            raise ValueError(f"proper: {source}: tensor {k!r} has shape {tuple(src.shape)}, the model expects "
                             f"{tuple(dst.shape)}")
        _check_values(k, src, state.cfg, source)
    for k, dst in targets.items():   # all checked: now write (all or nothing)
        dst.copy_(tensors[k])


def _check_values(key: str, t: Tensor, cfg: ProperConfig, source: str) -> None:
    """Per-user ranks in [0, user_rank] and finite per-user scales: a bad value would otherwise load and fail
    later in a kernel or give NaN outputs. (Weights are not checked: rows past a user's rank may hold anything,
    they are never read.)"""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "user_ranks" and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > cfg.user_rank:
            raise ValueError(f"proper: {source}: {key!r} must hold ranks in [0, {cfg.user_rank}] (user_rank), got "
                             f"{lo if lo < 0 else hi}")
    elif leaf == "user_scale" and t.numel():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise ValueError(f"proper: {source}: {key!r} must hold finite scales, got "
                             f"{float(t[bad][0])} for user {int(bad.nonzero()[0, 0])}")


def from_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Patch `model` (a fresh base model, or one already patched with the same config) and load a save."""
    info, tensors = read_saved(path)
    where = Path(path) / CONFIG_NAME
    try:
        cfg = ProperConfig.from_dict(info["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"proper.from_pretrained: {where}: invalid 'config': {e}") from None
    state = find_state(model)
    if state is None:
        apply_proper(model, cfg)
    elif not state.cfg.same_model(cfg):
        raise ValueError(f"proper.from_pretrained: the model is already patched with a different config "
                         f"({state.cfg}) than the save ({cfg})")
    state = get_state(model)
    load_proper_weights(model, tensors, source=str(Path(path) / WEIGHTS_NAME))
    set_stage(model, info["stage"], init_experts=False)
    state.experts_initialized = bool(info.get("experts_initialized", False))
    return model
