"""Exact export of one PROPER user to a standard peft LoRA folder, so any multi-LoRA engine can serve it.

Routing is per user (one gate vector and one weight w per user, broadcast to all of that user's tokens), so on
every adapted layer user u's whole delta is a single LoRA:

    dW_u = sum_{k: g_uk != 0} g_uk s_e B_k A_k  +  w_u s_u B_u[:, :r_u] A_u[:r_u]  =  B'_u A'_u
    A'_u = [A_k1; A_k2; ...; A_u[:r_u]]        B'_u = [g_uk1 s_e B_k1 | g_uk2 s_e B_k2 | ... | w_u s_u B_u[:, :r_u]]

of rank sum_selected r_e + r_u. What is exported follows the model's current stage, as ProperLinear.forward
runs it: "population" the population LoRA only (every user alike); "group" the selected experts; "user" the
selected experts (or, without experts, the population LoRA with gate 1) plus the user's own LoRA. User -1
exports the cold start: population-average gates, no user LoRA.

Every scale is folded into B' and each module gets lora_alpha = its rank (peft's alpha / r = 1, no rsLoRA);
the top-level r and lora_alpha are equal too, so an engine that reads only those (vLLM computes one
alpha / r per adapter) also applies scale 1. Modules where nothing runs for the user are left out.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..routing import user_routing
from ..state import get_state
from ..atomic import atomic_write

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX_NAME = "index.json"
INDEX_FORMAT = "proper-peft-export"
INDEX_VERSION = 1
_ROUTE_CHUNK = 256   # users routed per user_routing call in export_users: bounds the [B, K] tensors per layer

Routes = Dict[str, Tuple[Optional[Tensor], Optional[Tensor]]]


# ------------------------------------------------------------------------------------------------ checks
def _check_user(model: nn.Module, user_id, where: str = "export_peft_adapter: argument 'user_id'") -> None:
    U = get_state(model).cfg.num_users
    if isinstance(user_id, bool) or not isinstance(user_id, int) or not -1 <= user_id < U:
        raise ValueError(f"{where} must be an int in [-1, {U}) (-1 = cold start), got {user_id!r}")


def _check_per_user_routing(model: nn.Module) -> None:
    """Export is exact only when each user has one gate vector and one w; refuse a token-level router."""
    cfg = get_state(model).cfg
    for where, flag in (("ProperConfig.token_router", getattr(cfg, "token_router", False)),
                        ("ProperConfig.extra['token_router']", cfg.extra.get("token_router", False))):
        if flag:
            raise ValueError(f"export_peft_adapter: {where} is set: routing is per token, so a user's delta is not "
                             f"one LoRA and cannot be exported exactly")


def _check_options(max_rank, dtype) -> None:
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"export_peft_adapter: argument 'max_rank' must be None or an int >= 1, got {max_rank!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"export_peft_adapter: argument 'dtype' must be None or a floating torch.dtype (e.g. "
                        f"torch.bfloat16), got {dtype!r}")


def _route_rows(routes: Routes, B: int) -> Dict[str, Tuple[Optional[List[float]], Optional[List[float]]]]:
    """The routing of a batch of B users on the host, as Python floats (exact: they are at most fp64)."""
    out = {}
    for name, (g, w) in routes.items():
        if (g is not None and (g.dim() != 2 or g.shape[0] != B)) or (w is not None and tuple(w.shape) != (B,)):
            raise ValueError(f"export_peft_adapter: layer {name!r} routes per token (gates "
                             f"{None if g is None else tuple(g.shape)}, w {None if w is None else tuple(w.shape)}; "
                             f"expected [{B}, K] and [{B}]): a user's delta is not one LoRA there")
        out[name] = (None if g is None else g.double().cpu().tolist(), None if w is None else w.double().cpu().tolist())
    return out


# ---------------------------------------------------------------------------------------- one user's LoRA
def _layer_parts(layer, stage: str, user_id: int, gates: Optional[List[float]],
                 w: Optional[float]) -> List[Tuple[Tensor, Tensor, float]]:
    """(A [r, d_in], B [d_out, r], coefficient) of every LoRA that runs for this user here, in the order and
    with the branches of ProperLinear.forward; zero-gate experts and padded user rank rows are left out.
    ``user_id``: the user's table row (its slot in a paged model), -1 for none."""
    cfg = layer.cfg
    parts = []
    if stage == "population" or (stage == "user" and not cfg.num_experts):   # the population LoRA, K = 1, gate 1
        if layer.pop_rank:
            parts.append((layer.population_a[0], layer.population_b[0], cfg.population_scale))
    elif gates is not None:
        parts += [(layer.expert_a[k], layer.expert_b[k], cfg.expert_scale * g) for k, g in enumerate(gates) if g != 0]
    if stage == "user" and user_id >= 0:
        r = int(layer.user_ranks[user_id])
        coef = (1.0 if w is None else w) * float(layer.user_scale[user_id])
        if r > 0 and coef != 0:
            parts.append((layer.user_a[user_id, :r], layer.user_b[user_id, :, :r], coef))
    return parts


@torch.no_grad()
def _user_lora(model: nn.Module, user_id: int, rows, row: int, dtype) -> Tuple[Dict[str, Tensor], Dict[str, int]]:
    """peft-keyed tensors and {module: exact rank} of one user; B' is formed in fp64, then cast to dtype."""
    state = get_state(model)
    tensors, ranks = {}, {}
    table_row = state.user_row(user_id) if user_id >= 0 else -1   # resident: user_routing just paged it in
    for name, layer in state.layers.items():
        g, w = rows[name]
        parts = _layer_parts(layer, state.stage, table_row, None if g is None else g[row],
                             None if w is None else w[row])
        if not parts:
            continue
        a = torch.cat([p[0] for p in parts], 0)
        b = torch.cat([bk.double() * c for _, bk, c in parts], 1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype or layer.user_a.dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype or layer.user_a.dtype).contiguous()
        ranks[name] = a.shape[0]
    return tensors, ranks


def _pad(tensors: Dict[str, Tensor], ranks: Dict[str, int], max_rank: int) -> None:
    """Zero rank rows/columns up to max_rank (exact: they add nothing)."""
    for name, r in ranks.items():
        if r > max_rank:
            raise ValueError(f"export_peft_adapter: argument 'max_rank' is {max_rank}, but module {name!r} needs "
                             f"rank {r} for this user (sum of the selected experts' ranks plus the user's rank); "
                             f"pass max_rank >= {max(ranks.values())}")
        ka, kb = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
        a, b = tensors[ka], tensors[kb]
        tensors[ka] = torch.cat([a, a.new_zeros(max_rank - r, a.shape[1])], 0)
        tensors[kb] = torch.cat([b, b.new_zeros(b.shape[0], max_rank - r)], 1).contiguous()


def _adapter_config(model: nn.Module, ranks: Dict[str, int], R: int, padded: bool, base_model: str) -> Dict[str, Any]:
    """peft's LoraConfig fields; rank/alpha patterns (escaped full module paths: peft matches them as regex
    suffixes) only where the ranks differ from R."""
    layers = get_state(model).layers
    pattern = {} if padded else {re.escape(n): r for n, r in ranks.items() if r != R}
    name = type(model).__name__
    causal = name.endswith("ForCausalLM") or name.endswith("LMHeadModel")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
            "base_model_name_or_path": base_model, "r": R, "lora_alpha": R,
            "rank_pattern": pattern, "alpha_pattern": dict(pattern), "target_modules": sorted(ranks),
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": any(layers[n].conv1d for n in ranks), "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None}


def _base_model_name(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


# ------------------------------------------------------------------------------------------ atomic folders
def _atomic_dir(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a fresh folder beside `path`, fsync its files, then move it into place. An existing
    adapter folder (or an empty one) is replaced only once the new one is complete; anything else is refused."""
    if path.exists() and not (path.is_dir() and ((path / ADAPTER_CONFIG).is_file() or not any(path.iterdir()))):
        raise FileExistsError(f"export_peft_adapter: {path} exists and is not a peft adapter folder; refusing to "
                              f"replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent)))
    old = None
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_adapter(model, user_id: int, path: Path, rows, row: int, max_rank, dtype,
                   base_model: str) -> Optional[Dict[str, Any]]:
    """Write one user's adapter folder; {"ranks", "max_rank"}, or None when nothing runs for the user."""
    tensors, ranks = _user_lora(model, user_id, rows, row, dtype)
    if not ranks:
        return None
    R = max(ranks.values()) if max_rank is None else max_rank
    if max_rank is not None:
        _pad(tensors, ranks, max_rank)
    cfg = _adapter_config(model, ranks, R, max_rank is not None, base_model)
    meta = {"format": "pt", "proper_user": str(user_id), "proper_stage": get_state(model).stage}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))

    _atomic_dir(path, write)
    return {"ranks": ranks, "max_rank": R}


# ------------------------------------------------------------------------------------------------- public
def export_peft_adapter(model: nn.Module, user_id: int, path: Union[str, os.PathLike], *,
                        max_rank: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                        base_model: Optional[str] = None) -> Path:
    """Write user `user_id`'s whole delta (current stage; -1 = cold start) as a peft LoRA folder at `path`.

    Each module gets its smallest exact rank; `max_rank` pads every module to that one rank (for engines that
    need a fixed rank; smaller than a module needs raises). `dtype` is the stored dtype (default: the model's).
    `base_model` goes into base_model_name_or_path (default: the model config's name). Written atomically;
    an existing adapter folder at `path` is replaced. Raises ValueError for an unknown user, per-token routing,
    or a user for whom nothing runs in this stage (the base model serves them unchanged).
    """
    _check_user(model, user_id)
    _check_per_user_routing(model)
    _check_options(max_rank, dtype)
    path = Path(path)
    rows = _route_rows(user_routing(model, [user_id]), 1)
    info = _write_adapter(model, user_id, path, rows, 0, max_rank, dtype, base_model or _base_model_name(model))
    if info is None:
        raise ValueError(f"export_peft_adapter: nothing runs for user {user_id} in stage "
                         f"{get_state(model).stage!r} (no experts, population LoRA or user LoRA there): the base "
                         f"model serves it unchanged, there is no adapter to export")
    return path


def user_folder(user_id: int) -> str:
    """Folder name of a user inside an export_users directory."""
    return "cold_start" if user_id == -1 else f"user_{user_id}"


def export_users(model: nn.Module, ids: Sequence[int], out: Union[str, os.PathLike], *,
                 max_rank: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 names: Optional[Union[Sequence[str], Mapping[int, str]]] = None, progress: bool = True,
                 base_model: Optional[str] = None) -> Dict[str, Any]:
    """Export users `ids` (-1 = cold start) into out/user_<id>/ (out/cold_start/) and write out/index.json:

        {"format", "format_version", "base_model", "stage", "max_rank": the largest adapter rank,
         "users": {"<id>": {"folder", "name"?, "ranks": {module: exact rank}, "max_rank": the adapter's r}},
         "cold_start": the same record for -1, or null}

    A user for whom nothing runs gets "folder": null (serve the base model). `names`: user id -> name (a list
    indexed by id, or a mapping). Routing is computed for many users per call; returns the index.
    """
    ids = list(ids)
    for u in ids:
        _check_user(model, u, "export_users: every id in argument 'ids'")
    if len(set(ids)) != len(ids):
        raise ValueError("export_users: argument 'ids' holds duplicate user ids")
    _check_per_user_routing(model)
    _check_options(max_rank, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_model = base_model or _base_model_name(model)
    index: Dict[str, Any] = {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "base_model": base_model,
                             "stage": get_state(model).stage, "max_rank": 0, "users": {}, "cold_start": None}
    from tqdm.auto import tqdm

    slots = get_state(model).slots
    step = _ROUTE_CHUNK if slots is None else min(_ROUTE_CHUNK, slots.chunk)   # a paged chunk stays resident
    with tqdm(total=len(ids), desc="export", unit="user", disable=not progress) as bar:
        for lo in range(0, len(ids), step):
            chunk = ids[lo:lo + step]
            rows = _route_rows(user_routing(model, chunk), len(chunk))
            for row, u in enumerate(chunk):
                info = _write_adapter(model, u, out / user_folder(u), rows, row, max_rank, dtype, base_model)
                rec: Dict[str, Any] = {"folder": None if info is None else user_folder(u)}
                if names is not None and u >= 0:
                    name = names.get(u) if isinstance(names, Mapping) else (names[u] if u < len(names) else None)
                    if name is not None:
                        rec["name"] = name
                rec.update(info or {"ranks": {}, "max_rank": 0})
                index["max_rank"] = max(index["max_rank"], rec["max_rank"])
                if u == -1:
                    index["cold_start"] = rec
                else:
                    index["users"][str(u)] = rec
                bar.update(1)
    atomic_write(out / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    return index
