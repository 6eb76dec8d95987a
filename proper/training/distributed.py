"""Data parallelism for the trainer: the same code runs alone or under ``torchrun`` / ``accelerate launch``.

Launchers set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; :func:`init_from_env` then joins the process
group (gloo on CPU, NCCL when CUDA is available). Semantics, as torch DDP: every rank holds the whole model,
draws the same global batch and trains on its slice ``batch[rank::world]``; gradients are averaged over the
ranks before clipping and the optimizer step, so the ranks stay bit-identical. Evaluation is sharded the same
way and gathered back in order, so every rank sees the same dev losses (and makes the same early-stopping
decisions). Only rank 0 writes files.

We average the trainable gradients in one flat all-reduce after ``backward`` instead of wrapping the model
in ``DistributedDataParallel``: the set of trainable parameters changes with every PROPER stage (DDP would
have to be rebuilt per stage), and the group stage's extra losses read parameters outside the forward.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, List, Sequence

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group when launched with WORLD_SIZE > 1; returns whether we run distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence) -> List:
    """This rank's slice ``items[rank::world]`` (all items when not distributed)."""
    return list(items)[rank()::world_size()]


def unshard(parts: Sequence[Sequence]) -> List:
    """Inverse of :func:`shard`: ``parts[r]`` is rank r's slice; returns the items in their original order."""
    n = sum(len(p) for p in parts)
    out: List[Any] = [None] * n
    for r, p in enumerate(parts):
        out[r::len(parts)] = list(p)
    return out


def gather_sharded(local: Sequence) -> List:
    """All ranks' results of a sharded list, back in the original order, on every rank."""
    if world_size() == 1:
        return list(local)
    parts: List[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(local))
    return unshard(parts)


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Elementwise sum over the ranks of a few floats (fp64)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average ``p.grad`` over the ranks in one flat all-reduce (a missing grad counts as zeros)."""
    if world_size() == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off: off + n].view_as(g).to(g.dtype)
        off += n


def union_rows(rows: torch.Tensor) -> torch.Tensor:
    """Sorted unique union over the ranks of each rank's int64 rows [n_rank] (the users each rank's slice of the
    batch holds), so every rank's row-sparse optimizer step moves the same rows. Lengths differ per rank: one
    all-gather of the lengths, then one of the rows padded with -1 to the longest."""
    if world_size() == 1:
        return rows
    n = torch.tensor([rows.numel()], dtype=torch.int64, device=rows.device)
    ns = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(ns, n)
    longest = int(max(int(x) for x in ns))
    padded = torch.full((longest,), -1, dtype=torch.int64, device=rows.device)
    padded[: rows.numel()] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    u = torch.cat(parts).unique()
    return u[u >= 0]


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values into every rank's ``params`` (start all ranks from the same initialisation)."""
    if world_size() == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def state_digest(tensors: dict) -> str:
    """sha256 over the named tensors' bytes (sorted by name): equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_digests(tensors: dict) -> List[str]:
    """Every rank's :func:`state_digest`, in rank order (one entry when not distributed)."""
    d = state_digest(tensors)
    if world_size() == 1:
        return [d]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, d)
    return out
