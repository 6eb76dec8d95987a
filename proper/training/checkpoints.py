"""Resumable checkpoints of a run, and its JSON files: one write path, one resume path.

    OUT/checkpoints/<stage>-<step>[-done]/   proper.save_pretrained + trainer_state.pt
    OUT/checkpoints/latest.json              names the complete folder to resume from

A checkpoint folder is written completely under a temp name, renamed into place, and only then named by
latest.json (replaced atomically); older folders are removed last. A crash at any point leaves latest.json
naming a complete checkpoint. trainer_state.pt (optimizer and early-stopping state: tensors, numbers and
strings) is loaded with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers, so a crafted run folder cannot run code.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..io import atomic_write, atomic_write_json, from_pretrained, save_pretrained
from . import distributed as DD

STATE_NAME = "trainer_state.pt"
LATEST = "latest.json"


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    """An atomic JSON file (numpy scalars and tuples allowed)."""
    atomic_write_json(Path(path), obj, default=json_default)


def save_checkpoint(root: Path, model: nn.Module, state: Dict[str, Any], on_saved=None) -> None:
    """Write a resumable checkpoint of ``model`` and the trainer ``state`` ({"stage", "step", "finished",
    "optimizer", "early_stopping"}) under ``root``; ``on_saved()`` runs after the folder is in place and before
    latest.json names it (the trainer saves its progress there). Rank 0 writes; the others wait."""
    if not DD.is_main():
        DD.barrier()   # rank 0 writes; the others wait so that a resume sees a complete checkpoint
        return
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{state['stage']}-{state['step']:06d}{'-done' if state['finished'] else ''}"
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp)
    atomic_write(tmp / STATE_NAME, lambda t: torch.save(state, t))
    os.replace(tmp, d)
    if on_saved is not None:
        on_saved()
    write_json(root / LATEST, {"stage": state["stage"], "step": state["step"], "finished": state["finished"],
                               "dir": name})
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    DD.barrier()


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The folder latest.json names, or None when there is no checkpoint."""
    ptr = Path(root) / LATEST
    if not ptr.is_file():
        return None
    try:
        name = json.loads(ptr.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume: {ptr} is not a checkpoint pointer ({e})") from None
    d = Path(root) / str(name)
    if Path(name).name != name or not d.is_dir():
        raise ValueError(f"--resume: {ptr} names {name!r}, which is not a checkpoint folder of {root}")
    return d


def resume(root: Path, model: nn.Module, **load_kw) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """Load the latest checkpoint under ``root`` into ``model`` (patching it; ``load_kw``: from_pretrained's
    runtime switches); returns (folder, trainer state), or (None, None) when there is none."""
    d = latest_checkpoint(root)
    if d is None:
        return None, None
    from_pretrained(model, d, **load_kw)
    try:
        state = torch.load(d / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:   # weights_only refuses pickled code: never fall back to a full unpickle
        raise ValueError(f"--resume: {d / STATE_NAME} cannot be loaded safely (weights_only=True): {e}") from None
    if not isinstance(state, dict) or not {"stage", "step", "finished"} <= set(state):
        raise ValueError(f"--resume: {d / STATE_NAME} is not a trainer state (keys stage, step, finished)")
    return d, state
