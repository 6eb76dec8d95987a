"""ProperConfig: what gets adapted, with which ranks, experts and routers. JSON round trip via to_dict/from_dict."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch

from proper_kernels import BACKENDS as _KERNEL_BACKENDS

# The paper puts its LoRAs on the FFN projections; attention projections are opt-in.
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
LLAMA_ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKENDS = ("auto", *_KERNEL_BACKENDS)   # the op's own registry: a new kernel backend is accepted here too
STORE_DTYPES = ("float32", "bfloat16")
ADAPTER_DTYPES = ("float32", "bfloat16")
ROUTER_SCOPES = ("model", "heads", "layer")


@dataclass
class ProperConfig:
    """Hyper-parameters of a PROPER model layer.

    num_users        U: rows of the per-user LoRA tables (user ids 0..U-1; -1 = no user / cold start).
    num_experts      K: group LoRA experts; 0 = none (plain multi-user LoRA serving, punica/S-LoRA style).
    expert_rank      r_e of each expert (and of the population LoRA unless population_rank says otherwise).
    user_rank        r_max of the user table; an imported peft adapter may have any rank <= user_rank.
    top_k            experts kept per user after the softmax (renormalised); 0 or >= K = dense gates.
    alpha            LoRA alpha: scale alpha / r (alpha / sqrt(r) with use_rslora). expert_alpha and
                     user_alpha override it per part.
    target_modules   module names (suffix match, as in peft) or one regex string (full match).
    lora_router      True: the LoRA-aware router gives each user its group gates and weight w in the user
                     stage; False: w = 1 and the user-aware router's gates (user and group outputs just add).
    dropout          LoRA dropout on the adapter input, training only.
    backend          routed_lora backend: "auto" | "torch" | "cpu" | "triton" | "cuda". A runtime switch: never
                     saved (a checkpoint loads with "auto").
    router_dim       size of the user-aware router's per-user embedding.
    router_scope     where the user-aware router lives (the paper's "a user's group"):
                     "model" (default): one user embedding table and one head for the whole model, so each user
                     has ONE group assignment shared by every adapted layer (and one router row per user in the
                     store, not one per layer). It is held by the first adapted layer (so saving, the store,
                     freezing and the optimizer, which walk the layers' parts, carry it unchanged); the other
                     layers read it.
                     "heads": that shared embedding, with one head (and cold-start gates) per layer.
                     "layer": every layer its own embedding and head (the form before router_scope existed;
                     checkpoints saved without the field load as "layer").
    lora_router_probes  learned probe directions of the LoRA-aware router (see routers.LoRAAwareRouter).
    token_router     False (default): gates are per user (one vector per sequence, the paper's routing). True: each
                     layer adds a per-token term W_l x_t to the group-gate logits (LoRAMoE-style: a linear of the
                     layer's own input, [K, d_in], zero-initialised, so training starts from the per-user gates),
                     so gates vary token by token. A user's delta is then no longer one LoRA: the per-user export
                     (export_peft_adapter / proper export) is inexact and refuses it. Needs num_experts > 0;
                     trains with the router (group stage); decode cannot reuse a prepared call (its gates follow x).
    population_rank  rank of the population LoRA; None = expert_rank if num_experts > 0 else 0 (no population
                     LoRA: nothing would consume it). With num_experts = 0 and population_rank > 0, the
                     population LoRA keeps running under the users in the user stage (K = 1, gate 1).
    init_a           "kaiming" (peft's default for lora_A) or "gaussian" (std 1/r); B always starts at zero.
    router_init_std  std of the user embeddings' initialisation (distinct users start with distinct gates).
    user_init_seed   seed of every user's initial adapter: user u's A rows and router embedding come from a
                     generator seeded by (user_init_seed, layer, tensor, u), so a user created lazily (paged in
                     on first use) gets the same weights as one created eagerly.
    resident_users   S: user slots held in the model at once (the paged user store, proper/store/). None = all
                     num_users rows resident (dense tables, no paging). With S, every per-user tensor (A, B,
                     rank, scale, router embedding row, optimizer moment rows) lives in the store and
                     ``proper.users`` pages the batch's users into the S slots, least recently used out first.
    user_store       where the store keeps what is not resident: None = CPU memory; a folder path = memory-
                     mapped segment files there (only with resident_users).
    store_dtype      "float32" or "bfloat16": the dtype of the stored weights and moments (bf16 halves the
                     store; every eviction then rounds the user's rows to bf16).
    adapter_dtype    None (the base weights' dtype), "float32" or "bfloat16": the dtype of the adapter weights
                     (population, experts, users; the routers keep the base dtype). bf16 halves the bytes a decode
                     step reads (the adapters of a batch's users can weigh as much as the base model); the layer
                     casts its input to it for the op (as peft does), the op accumulates in fp32, and on the cpu
                     backend the fp32 delta is added into the base output without a bf16 rounding. Meant for
                     serving: training it is pure bf16 (bf16 Adam moments too); train in fp32 and load the
                     checkpoint with ``from_pretrained(..., adapter_dtype="bfloat16")``.
    resident_users, user_store, store_dtype and adapter_dtype are runtime switches (RUNTIME_FIELDS): a checkpoint
    does not depend on them, and loads with any of them.
    """

    num_users: int = 1
    num_experts: int = 0
    expert_rank: int = 8
    user_rank: int = 8
    top_k: int = 0
    alpha: float = 16.0
    target_modules: Union[Tuple[str, ...], str] = FFN_TARGETS
    lora_router: bool = True
    dropout: float = 0.0
    backend: str = "auto"
    router_dim: int = 32
    router_scope: str = "model"
    token_router: bool = False
    lora_router_probes: int = 2
    population_rank: Optional[int] = None
    expert_alpha: Optional[float] = None
    user_alpha: Optional[float] = None
    use_rslora: bool = False
    init_a: str = "kaiming"
    router_init_std: float = 1.0
    user_init_seed: int = 0
    resident_users: Optional[int] = None
    user_store: Optional[str] = None
    store_dtype: str = "float32"
    adapter_dtype: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)   # free-form notes kept through save/load

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        for name, lo in (("num_users", 1), ("num_experts", 0), ("expert_rank", 1), ("user_rank", 1), ("top_k", 0),
                         ("router_dim", 1), ("lora_router_probes", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"ProperConfig: '{name}' must be an int >= {lo}, got {v!r}")
        if self.population_rank is not None and (not isinstance(self.population_rank, int)
                                                 or self.population_rank < 0):
            raise ValueError(f"ProperConfig: 'population_rank' must be None or an int >= 0, "
                             f"got {self.population_rank!r}")
        for name in ("alpha", "expert_alpha", "user_alpha"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise ValueError(f"ProperConfig: '{name}' must be a finite float > 0, got {v!r}")
        for name in ("lora_router", "use_rslora", "token_router"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ProperConfig: '{name}' must be True or False, got {getattr(self, name)!r}")
        for name, ok, what in (("dropout", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)"),
                               ("router_init_std", lambda v: v >= 0.0, "a finite float >= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"ProperConfig: '{name}' must be {what}, got {v!r}")
        if isinstance(self.user_init_seed, bool) or not isinstance(self.user_init_seed, int) \
                or not 0 <= self.user_init_seed < 2 ** 63:
            raise ValueError(f"ProperConfig: 'user_init_seed' must be an int in [0, 2**63), got "
                             f"{self.user_init_seed!r}")
        S = self.resident_users
        if S is not None and (isinstance(S, bool) or not isinstance(S, int) or not 1 <= S <= self.num_users):
            raise ValueError(f"ProperConfig: 'resident_users' must be None (all users resident) or an int in "
                             f"[1, num_users={self.num_users}], got {S!r}")
        if isinstance(self.user_store, os.PathLike):
            self.user_store = os.fspath(self.user_store)
        if self.user_store is not None:
            if not isinstance(self.user_store, str) or not self.user_store:
                raise ValueError(f"ProperConfig: 'user_store' must be None (CPU memory) or a folder path (str), got "
                                 f"{self.user_store!r}")
            if S is None:
                raise ValueError("ProperConfig: 'user_store' needs 'resident_users' (a store only holds users that "
                                 "are not resident; with resident_users=None every user is in the model)")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"ProperConfig: 'store_dtype' must be one of {STORE_DTYPES}, got {self.store_dtype!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"ProperConfig: 'adapter_dtype' must be None (the base weights' dtype) or one of "
                             f"{ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"ProperConfig: 'extra' must be a dict, got {type(self.extra).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"ProperConfig: 'backend' must be one of {BACKENDS}, got {self.backend!r}")
        if self.token_router and self.num_experts == 0:
            raise ValueError("ProperConfig: 'token_router' needs num_experts > 0 (it routes tokens between experts)")
        if self.router_scope not in ROUTER_SCOPES:
            raise ValueError(f"ProperConfig: 'router_scope' must be one of {ROUTER_SCOPES}, got {self.router_scope!r}")
        if self.init_a not in ("kaiming", "gaussian"):
            raise ValueError(f"ProperConfig: 'init_a' must be 'kaiming' or 'gaussian', got {self.init_a!r}")
        t = self.target_modules
        if not (isinstance(t, str) and t) and not (isinstance(t, tuple) and t and all(isinstance(s, str) and s
                                                                                    for s in t)):
            raise ValueError(f"ProperConfig: 'target_modules' must be a non-empty tuple of module names or a "
                             f"regex string, got {t!r}")
        if isinstance(t, str):
            try:
                re.compile(t)
            except re.error as e:
                raise ValueError(f"ProperConfig: 'target_modules' is not a valid regex ({e}): {t!r}") from None

    # ---- derived values
    @property
    def pop_rank(self) -> int:
        if self.population_rank is not None:
            return self.population_rank
        return self.expert_rank if self.num_experts > 0 else 0

    @property
    def paged(self) -> bool:
        """Users live in a store and are paged into resident_users slots."""
        return self.resident_users is not None

    @property
    def table_rows(self) -> int:
        """Rows of each per-user table in the model: the slots when paged, else every user."""
        return self.num_users if self.resident_users is None else self.resident_users

    @property
    def effective_top_k(self) -> int:
        """Experts kept per user; K when top_k is 0 or >= K (dense)."""
        return self.num_experts if self.top_k <= 0 or self.top_k >= self.num_experts else self.top_k

    def scale(self, alpha: Optional[float], rank: int) -> float:
        a = self.alpha if alpha is None else alpha
        return a / math.sqrt(rank) if self.use_rslora else a / rank

    def adapter_torch_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        """The adapter weights' dtype for a base layer of dtype ``base_dtype``."""
        return base_dtype if self.adapter_dtype is None else getattr(torch, self.adapter_dtype)

    @property
    def expert_scale(self) -> float:
        return self.scale(self.expert_alpha, self.expert_rank)

    @property
    def population_scale(self) -> float:
        return self.scale(self.expert_alpha, self.pop_rank) if self.pop_rank else 0.0

    @property
    def user_scale(self) -> float:
        return self.scale(self.user_alpha, self.user_rank)

    # ---- JSON
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    #: Fields that steer how the model runs, not what it is: never saved, ignored when comparing models.
    RUNTIME_FIELDS = ("backend", "resident_users", "user_store", "store_dtype", "adapter_dtype")

    def saved_dict(self) -> Dict[str, Any]:
        """to_dict() without the runtime switches (what a checkpoint stores)."""
        d = self.to_dict()
        for name in self.RUNTIME_FIELDS:
            d.pop(name)
        return d

    def same_model(self, other: "ProperConfig") -> bool:
        """Equal but for the runtime switches: both describe the same adapters and routers."""
        return self.saved_dict() == other.saved_dict()

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ProperConfig":
        if not isinstance(d, dict):
            raise TypeError(f"ProperConfig.from_dict: expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ProperConfig.from_dict: unknown keys {unknown}; known keys: {sorted(names)}")
        if "router_scope" not in d:   # saved before the field existed: every layer had its own router
            d = {**d, "router_scope": "layer"}
        return cls(**d)
