"""Saving and loading PROPER weights: safetensors, one atomic step per save, never a pickle.

Layout of a saved directory:
    proper_model.safetensors   every PROPER tensor (not the base model), keyed "<module>.<tensor>"; its metadata
                               holds the format tag and the whole save record (config, stage, save id, and the
                               id of the save it replaced)
    proper_config.json         the same record, for people and tools
    users/<uuid>.seg           a paged model's user store (proper/store/segments.py): the segments that the
                               record's "user_store" entry names. Only segments with users saved since the last
                               save into this folder are written; the others are kept or hard-linked.

Atomicity: the weights file is the commit point. A save writes it to a temp file and renames it over the old
one (os.replace is atomic), then rewrites the json the same way. A crash before the first rename leaves the
previous save whole; a crash between the two leaves complete new weights beside the previous json, which
:func:`read_saved` recognises (the weights name the json's save as the one they replaced) and loads as the new
save. Weights and a json of unrelated saves are refused. Temp files of a killed save are removed by the next
save. Runtime switches (``ProperConfig.RUNTIME_FIELDS``) are never written. Store segments are written before
the commit point under new names and never rewritten; segments that no committed save names are deleted after
the commit.

Dense and paged models read each other's saves: a paged save loads into a dense model by reading every stored
user into the tables; a dense save loads into a paged model by putting every user into the store.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from ..config import ProperConfig
from ..patch import apply_proper, set_stage
from ..routing import refresh_cold_start
from ..state import STAGES, ProperState, find_state, get_state
from ..store import ROW_KEYS, Segment, UserStore, initial_row, remove_unlisted, row_tables
from ..atomic import atomic_write, atomic_write_text, remove_leftovers

log = logging.getLogger("proper.io")

WEIGHTS_NAME = "proper_model.safetensors"
CONFIG_NAME = "proper_config.json"
FORMAT = "proper"
FORMAT_VERSION = 1
STORE_DIR = "users"
COLD_START_KEY = ".router.cold_start"
_RECORD_KEYS = ("format", "format_version", "save_id", "config", "stage")   # required in every save record


def proper_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """Every PROPER tensor of the model (parameters and buffers, base weights excluded), by "<module>.<name>",
    part by part (ProperLinear.PARTS). A paged model's per-user slot tables are left out (their users live in
    the user store)."""
    return {k: t.detach() for k, t in _targets(get_state(model)).items()}


def _targets(state: ProperState) -> Dict[str, Tensor]:
    paged = state.slots is not None
    return {f"{name}.{k}": t for name, layer in state.layers.items() for k, t in layer.adapter_tensors().items()
            if not (paged and k in ROW_KEYS)}


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
    segments = None
    if state.slots is not None:   # the user store first: new segments under new names, before the commit point
        state.slots.flush()
        segments = state.slots.store.save_into(path / STORE_DIR)
        info["user_store"] = {"folder": STORE_DIR, "segments": segments, "users": len(state.slots.store),
                              "resident_users": state.cfg.resident_users}
    tensors = {k: t.contiguous() for k, t in proper_state_dict(model).items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "save_id": info["save_id"],
            "record": json.dumps(info, sort_keys=True)}
    blob = safetensors_bytes(tensors, metadata=meta)   # serialised here: safetensors' own temp files never appear
    atomic_write(path / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(blob))   # the commit point
    atomic_write_text(path / CONFIG_NAME, json.dumps(info, indent=2, sort_keys=True))
    if (path / STORE_DIR).is_dir():   # committed: segments no save names any more go
        remove_unlisted(path / STORE_DIR, segments or [])
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
    targets = _targets(state)
    dense_rows = {}
    if state.slots is not None:   # a dense save into a paged model: its per-user tables go into the store
        dense_rows = {k: tensors[k] for k, *_ in row_tables(state) if k in tensors}
        tensors = {k: t for k, t in tensors.items() if k not in dense_rows}
    # a paged model's cold-start buffers (router.cold_start) exist in paged saves only: a dense model ignores
    # them (it averages over its table), a paged model loading a dense save recomputes them below
    cold = {k for k in set(targets) ^ set(tensors) if k.endswith(COLD_START_KEY)}
    tensors = {k: t for k, t in tensors.items() if k not in cold}
    targets = {k: t for k, t in targets.items() if k not in cold}
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
    if dense_rows:
        _check_dense_rows(state, dense_rows, source)
    for k, dst in targets.items():   # all checked: now write (all or nothing)
        dst.copy_(tensors[k])
    if dense_rows:
        _dense_rows_into_store(state, dense_rows)
    if cold and state.slots is not None:
        refresh_cold_start(model)


def _check_dense_rows(state: ProperState, rows: Dict[str, Tensor], source: str) -> None:
    tables = {k: t for k, _, _, t in row_tables(state)}
    if set(rows) != set(tables):
        raise ValueError(f"proper: {source} hold only some of the per-user tensors: missing "
                         f"{sorted(set(tables) - set(rows))[:5]}")
    for k, t in rows.items():
        want = (state.cfg.num_users, *tables[k].shape[1:])
        if tuple(t.shape) != want:
            raise ValueError(f"proper: {source}: tensor {k!r} has shape {tuple(t.shape)}, the model expects "
                             f"{want} (num_users rows)")
        _check_values(k, t, state.cfg, source)


def _dense_rows_into_store(state: ProperState, rows: Dict[str, Tensor]) -> None:
    slots = state.slots
    slots.drop_all()
    for u in range(state.cfg.num_users):
        slots.store.put(u, {k: _stored_row(t[u], state.cfg.store_dtype, k) for k, t in rows.items()})


def _stored_row(t: Tensor, store_dtype: str, key: str) -> Tensor:
    if t.is_floating_point() and not key.endswith("user_scale"):
        t = t.to(torch.bfloat16 if store_dtype == "bfloat16" else torch.float32)
    return t.detach().to("cpu", copy=True).contiguous()


@torch.no_grad()
def _open_store(state: ProperState, folder: Path, segments, source: Path) -> None:
    """Make a save's user store this model's: opened (headers only) by a paged model, read into the tables by a
    dense one."""
    opened = [Segment(folder / n) for n in segments]   # headers only, each parsed once
    bad = [u for seg in opened for u in seg.users if not 0 <= u < state.cfg.num_users]
    if bad:
        raise ValueError(f"proper.from_pretrained: {source} stores user {bad[0]} but num_users is "
                         f"{state.cfg.num_users}")
    if state.slots is not None:
        state.slots.drop_all()
        state.slots.store.replace_with(opened)
        return
    store = UserStore(None)
    store.replace_with(opened)
    tables = row_tables(state)
    for u in range(state.cfg.num_users):   # a dense model: every stored user into the tables, the rest initial
        rec = store.get(u)
        for k, layer, local, t in tables:
            if rec is not None and k in rec:
                t[u].copy_(rec[k])
            else:
                initial_row(state, layer, local, u, t[u])


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


_SAVED = object()


def from_pretrained(model: nn.Module, path: Union[str, os.PathLike], *, resident_users=_SAVED,
                    user_store: Union[str, os.PathLike, None] = None, store_dtype: Optional[str] = None,
                    backend: Optional[str] = None, adapter_dtype: Optional[str] = None) -> nn.Module:
    """Patch `model` (a fresh base model, or one already patched with the same config) and load a save.

    The runtime switches apply to a fresh model: ``resident_users`` (default: as the save was made, paged or
    dense), ``user_store`` (None: CPU memory), ``store_dtype``, ``backend`` and ``adapter_dtype`` (e.g. a model
    trained in fp32, served with bf16 adapters: the weights are rounded once, at load). A paged save opens its
    user store without reading the users (each is read when it is first paged in)."""
    path = Path(path)
    info, tensors = read_saved(path)
    where = path / CONFIG_NAME
    saved_store = info.get("user_store")
    try:
        d = dict(info["config"])
        d["resident_users"] = (saved_store or {}).get("resident_users") if resident_users is _SAVED \
            else resident_users
        switches = (("user_store", user_store), ("store_dtype", store_dtype), ("backend", backend),
                    ("adapter_dtype", adapter_dtype))
        d.update({k: v for k, v in switches if v is not None})
        cfg = ProperConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"proper.from_pretrained: {where}: invalid 'config': {e}") from None
    state = find_state(model)
    if state is None:
        apply_proper(model, cfg)
    elif not state.cfg.same_model(cfg):
        raise ValueError(f"proper.from_pretrained: the model is already patched with a different config "
                         f"({state.cfg}) than the save ({cfg})")
    state = get_state(model)
    if saved_store is not None:
        _check_store_entry(saved_store, where)
        load_proper_weights(model, _with_current_rows(state, tensors), source=str(path / WEIGHTS_NAME))
        _open_store(state, path / saved_store["folder"], saved_store["segments"], path)
    else:
        load_proper_weights(model, tensors, source=str(path / WEIGHTS_NAME))
    set_stage(model, info["stage"], init_experts=False)
    state.experts_initialized = bool(info.get("experts_initialized", False))
    return model


def _check_store_entry(entry, where: Path) -> None:
    ok = isinstance(entry, dict) and entry.get("folder") == STORE_DIR and isinstance(entry.get("segments"), list) \
        and all(isinstance(n, str) and "/" not in n and "\\" not in n and not n.startswith(".")
                for n in entry["segments"])
    if not ok:
        raise ValueError(f"proper.from_pretrained: {where}: a damaged 'user_store' entry {str(entry)[:200]}")


def _with_current_rows(state: ProperState, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A paged save's tensors, plus a dense model's own per-user tables (they are filled from the store next)."""
    if state.slots is not None:
        return tensors
    return {**tensors, **{k: t.detach() for k, _, _, t in row_tables(state)}}
