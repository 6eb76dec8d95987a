"""Layer-level benchmark cases and the work each one must do (bytes to read, FLOPs really needed)."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch

from .op_check import layer_inputs


@dataclass(frozen=True)
class LayerCase:
    phase: str          # "decode" (1 token per user sequence) | "prefill" (many tokens per user)
    n_users: int        # distinct users in the batch
    popularity: str     # "distinct" | "uniform" | "zipf" | "identical"
    user_rank: int      # r_max; "mixed" ranks draw r_u in [r_max/4, r_max]
    mixed_ranks: bool
    K: int              # group experts (0 = plain multi-user LoRA serving)
    top_k: int
    d: int = 2048
    expert_rank: int = 16
    training: bool = False   # forward + backward

    @property
    def tokens(self) -> int:
        if self.phase == "decode":
            return max(self.n_users, 64) if self.popularity != "distinct" else self.n_users
        return 2048 if self.d <= 2048 else 512

    @property
    def name(self) -> str:
        r = f"r{self.user_rank}{'mix' if self.mixed_ranks else ''}"
        k = f"K{self.K}top{self.top_k}" if self.K else "K0"
        return f"{self.phase}-T{self.tokens}-U{self.n_users}-{self.popularity}-{r}-{k}-d{self.d}" + \
            ("-train" if self.training else "")

    def asdict(self) -> Dict[str, object]:
        return {**asdict(self), "tokens": self.tokens, "name": self.name}


def make_inputs(case: LayerCase, seed: int = 0):
    """routed_lora keyword arguments for `case` (fp32, NaN in padded rank rows)."""
    kw = layer_inputs(case.tokens, case.n_users, d=case.d, K=max(case.K, 1), r_e=case.expert_rank,
                      r_max=case.user_rank, top_k=min(case.top_k, max(case.K, 1)) if case.K else 1,
                      distinct=case.popularity == "distinct", seed=seed, mixed_ranks=case.mixed_ranks)
    T = case.tokens
    gen = torch.Generator().manual_seed(seed + 7)
    users = torch.unique(kw["user_ids"])
    if case.popularity == "zipf":
        p = 1.0 / torch.arange(1, len(users) + 1, dtype=torch.float64) ** 1.2
        kw["user_ids"] = users[torch.multinomial(p, T, replacement=True, generator=gen)]
    elif case.popularity == "identical":
        kw["user_ids"] = users[:1].expand(T).clone()
    if case.K == 0:
        kw.update(expert_a=None, expert_b=None, gates=None)
    return kw


def work(case: LayerCase, kw, element_size: int = 4) -> Dict[str, float]:
    """Bytes the op must read and write (each weight once) and the FLOPs really needed.

    element_size: bytes per value of the tensors the op is run on (4: fp32, as make_inputs builds them; 2: bf16).
    """
    d, T, el = case.d, case.tokens, element_size
    present = torch.unique(kw["user_ids"])
    ranks = kw["user_ranks"][present]
    user_bytes = int(ranks.sum()) * 2 * d * el
    flops_rank = ranks[torch.searchsorted(present, kw["user_ids"])].sum().item()   # sum over tokens of r_u
    expert_bytes = 0
    if kw.get("gates") is not None:
        used = (kw["gates"] != 0).any(0)
        expert_bytes = int(used.sum()) * case.expert_rank * 2 * d * el + kw["gates"].numel() * el
        flops_rank += (kw["gates"] != 0).sum().item() * case.expert_rank
    io = 2 * T * d * el                                 # read x, write delta
    passes = 3 if case.training else 1                  # backward reads/writes roughly twice more
    return {"bytes": (user_bytes + expert_bytes + io) * passes, "flops": 4.0 * d * flops_rank * passes}


def grid(quick: bool) -> List[LayerCase]:
    """The cases of one suite run; `quick` keeps `proper bench` under a few minutes on 2 cores."""
    cases: List[LayerCase] = []
    if quick:
        for n in (1, 8, 64):
            cases.append(LayerCase("decode", n, "distinct", 16, False, 8, 2))
        cases.append(LayerCase("decode", 64, "distinct", 16, False, 0, 0))
        cases.append(LayerCase("prefill", 16, "uniform", 16, False, 8, 2))
        cases.append(LayerCase("decode", 64, "distinct", 16, False, 8, 2, training=True))
        return cases
    for n in (1, 8, 64, 256):                                       # number of users
        cases.append(LayerCase("decode", n, "distinct", 16, False, 8, 2))
        cases.append(LayerCase("decode", n, "distinct", 16, False, 0, 0))
    for pop in ("uniform", "zipf", "identical"):                    # popularity
        cases.append(LayerCase("decode", 64, pop, 16, False, 8, 2))
        cases.append(LayerCase("prefill", 16, pop, 16, False, 8, 2))
    for r, mixed in itertools.product((8, 16, 32, 64), (False, True)):   # user rank
        cases.append(LayerCase("decode", 64, "distinct", r, mixed, 8, 2))
    for K, top in ((0, 0), (4, 1), (4, 2), (8, 1), (8, 2), (8, 8)):  # experts and top-k
        cases.append(LayerCase("prefill", 16, "uniform", 16, False, K, top))
    for phase, n in (("decode", 64), ("prefill", 16)):              # training
        cases.append(LayerCase(phase, n, "distinct" if phase == "decode" else "uniform", 16, False, 8, 2,
                               training=True))
        cases.append(LayerCase(phase, n, "distinct" if phase == "decode" else "uniform", 16, False, 0, 0,
                               training=True))
    return list(dict.fromkeys(cases))
