"""ProperLinear: one adapted linear layer, y = W x + routed_lora(x, experts, gates, user adapters, ...).

Every stage goes through a single routed_lora call per forward (no Python loop over users or experts):

    population  the population LoRA as the op with K = 1 and gate 1 for every token
    group       the K experts, gated per user by the user-aware router
    user        the (frozen) experts + each user's own LoRA, weighted by w; with lora_router, the LoRA-aware
                router derives the user's gates and w from that user's LoRA

Routing is computed per user ([B] rows) and broadcast to that user's tokens; the per-token ids and the token
layout come from the batch's user context (built once, shared by every layer). Under torch.no_grad the
per-layer routing is cached for the life of the users() context (keyed on the parameters' version counters, so
an in-place update invalidates it): decode steps pay for the routed_lora call only.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proper_kernels import PreparedRoutedLoRA, prepare_routed_lora, routed_lora

from .. import context
from ..config import ProperConfig
from ..state import ProperState
from ..store import initial_rows
from .routers import LoRAAwareRouter, UserAwareRouter


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer that stores its weight as [d_in, d_out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_dims(module: nn.Module) -> Tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def _init_a(t: Tensor, how: str, rank: int) -> None:
    """peft's lora_A initialisation, applied to each [r, d_in] slice (population and experts; each user's A
    comes from its own seeded generator, proper/store/init.py)."""
    with torch.no_grad():
        if how == "gaussian":
            t.normal_(0.0, 1.0 / max(rank, 1))
        else:   # kaiming_uniform_(a=sqrt(5)) on [r, d_in]: bound = 1 / sqrt(d_in)
            bound = 1.0 / math.sqrt(t.shape[-1])
            t.uniform_(-bound, bound)


class ProperLinear(nn.Module):
    """Wraps one nn.Linear (or GPT-2 Conv1D) of one model instance.

    ``PARTS`` is the one place that says which tensors form which part (peft's "the layer declares its adapter
    parts"); freezing, optimizer groups, expert initialisation, saving and the tests iterate it through
    :meth:`part_tensors` / :meth:`part_parameters`. A part a config does not create is simply absent.

    Keeps the base `weight` and `bias` Parameters themselves (same objects, same state-dict keys as before),
    and adds, in peft layouts:
        population_a [1, r_p, d_in]   population_b [1, d_out, r_p]      (if r_p > 0)
        expert_a     [K, r_e, d_in]   expert_b     [K, d_out, r_e]      (if K > 0) + router (UserAwareRouter:
                     in every layer, only a head on the shared embedding, or only in the first adapted layer:
                     cfg.router_scope "layer" / "heads" / "model"; see user_router)
        user_a       [U, r, d_in]     user_b       [U, d_out, r]
        user_ranks   [U] int64 buffer: rank of each user's adapter (<= r); rows past it stay zero, never read
        user_scale   [U] fp32 buffer: alpha / r_u per user (alpha / sqrt(r_u) for rsLoRA)
    where U is cfg.table_rows: every user, or the resident_users slots of a paged model (rows are then slots,
    filled by proper/store/slots.py; users(model, ids) hands the layers slot rows)
        lora_router  LoRAAwareRouter (if cfg.lora_router)
    Every B starts at zero, as in LoRA, so a freshly patched model computes exactly the base model.
    """

    PARTS: Dict[str, Tuple[str, ...]] = {
        "population": ("population_a", "population_b"),
        "experts": ("expert_a", "expert_b"),
        "router": ("router", "token_router"),                   # UserAwareRouter (a module: all its tensors), and
                                                                # the per-token logit term (cfg.token_router)
        "users": ("user_a", "user_b", "user_ranks", "user_scale"),
        "lora_router": ("lora_router",),                        # LoRAAwareRouter
    }
    #: Parts whose parameters train at the routers' learning rate.
    ROUTER_PARTS = ("router", "lora_router")

    def __init__(self, base: nn.Module, cfg: ProperConfig, state: ProperState, name: str = ""):
        super().__init__()
        self.conv1d = is_conv1d(base)
        self.in_features, self.out_features = linear_dims(base)
        self.weight = base.weight
        self.bias = base.bias
        self.name = name
        self._state = state
        dev, dt = base.weight.device, base.weight.dtype
        d_in, d_out, K, U = self.in_features, self.out_features, cfg.num_experts, cfg.table_rows
        z = dict(device=dev, dtype=dt)                                       # routers: the base dtype
        za = dict(device=dev, dtype=cfg.adapter_torch_dtype(dt))           # the LoRA weights (adapter_dtype)

        self.pop_rank = cfg.pop_rank
        if self.pop_rank:
            self.population_a = nn.Parameter(torch.empty(1, self.pop_rank, d_in, **za))
            self.population_b = nn.Parameter(torch.zeros(1, d_out, self.pop_rank, **za))
            _init_a(self.population_a, cfg.init_a, self.pop_rank)
        if K:
            self.expert_a = nn.Parameter(torch.empty(K, cfg.expert_rank, d_in, **za))
            self.expert_b = nn.Parameter(torch.zeros(K, d_out, cfg.expert_rank, **za))
            _init_a(self.expert_a, cfg.init_a, cfg.expert_rank)
            shared = state.router   # the model-level router, once the first adapted layer made it
            if cfg.router_scope == "layer" or shared is None:
                self.router = UserAwareRouter(U, K, cfg.router_dim, cfg.effective_top_k, cfg.router_init_std,
                                              paged=cfg.paged, draw_rows=False, **z)
                if cfg.router_scope != "layer" and shared is None:
                    state.router, state.router_layer = self.router, name
            elif cfg.router_scope == "heads":
                self.router = UserAwareRouter(U, K, cfg.router_dim, cfg.effective_top_k, cfg.router_init_std,
                                              paged=cfg.paged, shared=shared, **z)
            # router_scope="model": no router here; user_router is the first layer's
            if cfg.token_router:   # [K, d_in], zero: routing starts per user (and nothing is drawn from the RNG)
                self.token_router = nn.Parameter(torch.zeros(K, d_in, **z))
        self.user_a = nn.Parameter(torch.zeros(U, cfg.user_rank, d_in, **za))
        self.user_b = nn.Parameter(torch.zeros(U, d_out, cfg.user_rank, **za))
        if not cfg.paged:   # every user's initial rows now (a paged model creates them when it pages users in)
            with torch.no_grad():
                self.user_a.copy_(initial_rows(state, name, "user_a", range(U), self.user_a))
                if K and "router" in self._modules and self.router.owns_table:
                    w = self.router.embedding.weight
                    w.copy_(initial_rows(state, name, "router.embedding.weight", range(U), w))
        self.register_buffer("user_ranks", torch.full((U,), cfg.user_rank, dtype=torch.int64, device=dev))
        self.register_buffer("user_scale", torch.full((U,), cfg.user_scale, dtype=torch.float32, device=dev))
        if cfg.lora_router:
            self.lora_router = LoRAAwareRouter(d_in, d_out, K, cfg.lora_router_probes, **z)
        self._full_rank = (-1, True)   # (user_ranks version, all ranks == r_max): lets us pass user_ranks=None

    # ------------------------------------------------------------------------------------------ parts
    def part_tensors(self, part: str) -> Dict[str, Tensor]:
        """{state-dict key local to this layer: tensor} of one part (parameters and buffers); {} if absent."""
        if part not in self.PARTS:
            raise ValueError(f"ProperLinear: unknown part {part!r}; parts: {tuple(self.PARTS)}")
        out: Dict[str, Tensor] = {}
        for attr in self.PARTS[part]:
            if attr in self._modules:
                out.update({f"{attr}.{k}": t for k, t in self._modules[attr].state_dict(keep_vars=True).items()})
            elif attr in self._parameters or attr in self._buffers:
                out[attr] = getattr(self, attr)
        return out

    def part_parameters(self, part: str) -> List[nn.Parameter]:
        return [t for t in self.part_tensors(part).values() if isinstance(t, nn.Parameter)]

    def adapter_tensors(self) -> Dict[str, Tensor]:
        """Every PROPER tensor of this layer by local key, part by part (the base weight and bias excluded)."""
        return {k: t for part in self.PARTS for k, t in self.part_tensors(part).items()}

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def cfg(self) -> ProperConfig:
        return self._state.cfg

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"{self.in_features} -> {self.out_features}, conv1d={self.conv1d}, "
                f"users={c.num_users}x r{c.user_rank}, "
                f"experts={c.num_experts}x r{c.expert_rank} top{c.effective_top_k}, population r{self.pop_rank}, "
                f"lora_router={c.lora_router}")

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the LoRA weights are held in (cfg.adapter_dtype, or whatever model.to(...) made them)."""
        return self._parameters["user_a"].dtype

    def base_forward(self, x: Tensor) -> Tensor:
        """The wrapped layer on x [T, d_in] -> [T, d_out]."""
        if self.conv1d:   # Conv1D: y = x @ W + b with W stored [d_in, d_out]
            return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        return F.linear(x, self.weight, self.bias)

    def _ranks_arg(self) -> Optional[Tensor]:
        """user_ranks, or None when every user has the full rank (saves the kernels a mask); cached by version."""
        v = self.user_ranks._version
        if self._full_rank[0] != v:
            self._full_rank = (v, bool((self.user_ranks == self.cfg.user_rank).all()))
        return None if self._full_rank[1] else self.user_ranks

    def _route_params(self):
        """The tensors routing depends on, and user_ranks (their version counters key the no_grad caches of
        routing and of prepared calls); listed once, since
        nn.Module attribute lookups cost more than the check itself. Parameters are updated in place (optimizer
        steps, load_state_dict, copy_), so the list stays valid; del layer._route_list after reassigning one."""
        ps = self.__dict__.get("_route_list")
        if ps is None:
            ps = self.__dict__["_route_list"] = self._list_route_params()
        return ps

    @property
    def user_router(self) -> Optional[UserAwareRouter]:
        """The user-aware router this layer routes with: its own, or the model-level one (router_scope)."""
        r = self._modules.get("router")
        return r if r is not None else self._state.router

    def _list_route_params(self):
        ps = []   # every router that exists, whether switched on or not, the shared table included
        r = self.user_router
        if r is not None:
            ps += [*r.parameters(), *r.buffers()] + ([] if r.owns_table else [r.table.weight])
        if "lora_router" in self._modules:
            ps += [*self.part_tensors("lora_router").values(), *self.part_tensors("users").values()]
        return ps + [self.user_ranks]   # the prepared call's user_ranks argument (_ranks_arg) depends on it

    def _lora_router_terms(self, batch: "context.UserBatch", ids: Tensor,
                           stage: str) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The LoRA-aware router's (gate-logit correction [B, K] or None, w [B] or None) for the users `ids`."""
        if not (stage == "user" and batch.has_known and context.lora_router_active(self._state)):
            return None, None
        u = ids.clamp(min=0)
        ranks = self._ranks_arg()   # None for full ranks: nothing to mask
        if batch.covers_table and self.user_a.shape[0] == batch.num_users:
            # every table row is in the batch: route the whole table and pick rows of the small [U, K + 1] result
            # (no gathered copies of user_a / user_b, whose backward would zero and index_add full-table tensors)
            delta, w = self.lora_router(self.user_a, self.user_b, ranks, self.user_scale)
            return (None if delta is None else delta.index_select(0, u)), w.index_select(0, u)
        # index_select, not [u]: its backward is an index_add, far cheaper than advanced indexing's index_put
        return self.lora_router(self.user_a.index_select(0, u), self.user_b.index_select(0, u),
                                None if ranks is None else ranks[u], self.user_scale[u])

    def route_users(self, batch: "context.UserBatch", ids: Tensor,
                    stage: str) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Per-user (gates [B, K] or None, w [B] or None) for the users `ids` [B] of this batch."""
        delta, w = self._lora_router_terms(batch, ids, stage)
        gates = None
        if self.cfg.num_experts:
            gates = self.user_router(ids, extra_logits=delta, cold_start=batch.has_unknown)
        return gates, w

    def _per_token_routing(self, batch: "context.UserBatch", xf: Tensor, stage: str,
                           nb: int) -> Tuple[Tensor, Optional[Tensor]]:
        """With cfg.token_router: per-token (gates [T, K], w [T] or None). gates[t] = top_k(softmax(W e_u + b + c_u
        + W_l x_t)): the user-aware logits and the LoRA-aware correction c_u of each token's user (computed once per
        user, with that user's w), plus the layer's token term."""
        per = xf.shape[0] // nb
        ids = batch.sample_ids(nb, xf.device)
        r = self.user_router
        logits = r.logits(ids)                                                    # [nb, K]: once per user
        delta, w = self._lora_router_terms(batch, ids, stage)
        if delta is not None:
            logits = logits + delta
        logits, w = _expand(logits, w, nb, per)
        logits = logits + F.linear(xf, self.token_router)                         # [T, K]
        return r.gates(logits, batch.tokens(nb, per, xf.device).ids, cold_start=batch.has_unknown), w

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            y = self._prepared_forward(x)
            if y is not None:
                return y
        d_in, d_out = self.in_features, self.out_features
        T = x.numel() // d_in
        shape = x.shape[:-1] + (d_out,)
        xf = x.reshape(T, d_in)
        # y stays 2-D and is not a view: the delta is added into it in place, which on a view would make
        # autograd rebase the view's history (CopySlices) and clone the whole output gradient in backward
        y = self.base_forward(xf)                                                 # [T, d_out]
        st = self._state
        cfg = st.cfg
        stage = st.stage
        if T == 0:
            return y.view(shape)
        batch = nb = None
        if stage != "population":
            batch = context.current_batch(st, self.name)
            if torch.is_grad_enabled():
                st.record_touched(batch.ids)   # the rows this step may move (proper/optim.py)
            nb = x.shape[0] if x.dim() >= 2 else 1
        args = self._op_args(batch, stage, xf, nb)
        if args is None:
            return y.view(shape)
        if self.training and cfg.dropout > 0:
            xf = F.dropout(xf, cfg.dropout)
        same = xf.dtype == self.adapter_dtype   # else the op runs in adapter_dtype and its delta is added to y
        delta = routed_lora(xf if same else xf.to(self.adapter_dtype), out=y if same else None, **args)
        if not same:
            y.add_(delta)
        return y.view(shape)

    def _op_args(self, batch: Optional["context.UserBatch"], stage: str, xf: Tensor,
                 nb: Optional[int]) -> Optional[Dict[str, object]]:
        """routed_lora's arguments but x (and out) for this layer in `stage` on the tokens xf [T, d_in] (nb rows of
        `batch`; no batch in the population stage), or None when there is no delta. The one place that decides
        which parts run: the general forward and the prepared (no-grad) forward both call it."""
        cfg = self.cfg
        T = xf.shape[0]
        ea = eb = gates = ua = ub = ids_t = w_t = lay = None
        expert_scale = cfg.expert_scale
        if stage == "population":
            if self.pop_rank:
                ea, eb, gates = self.population_a, self.population_b, _ones(xf, T)
                expert_scale = cfg.population_scale
        else:
            if "token_router" in self._parameters:
                gates, w_t = self._per_token_routing(batch, xf, stage, nb)
            else:
                gates, w_t = self._token_routing(batch, stage, nb, T // nb, xf.device)
            if gates is not None:
                ea, eb = self.expert_a, self.expert_b
            elif stage == "user" and self.pop_rank and not cfg.num_experts:
                ea, eb, gates = self.population_a, self.population_b, _ones(xf, T)   # K = 1, gate 1
                expert_scale = cfg.population_scale
            if stage == "user" and batch.has_known:   # (w_t is None otherwise: route_users gives no w)
                ua, ub = self.user_a, self.user_b
                tb = batch.tokens(nb, T // nb, xf.device)                         # built once per batch shape
                ids_t, lay = tb.ids, tb.layout
        if ea is None and ua is None:
            return None
        return dict(expert_a=ea, expert_b=eb, gates=gates, user_a=ua, user_b=ub, user_ids=ids_t,
                    user_ranks=self._ranks_arg() if ua is not None else None, expert_scale=expert_scale,
                    user_scale=self.user_scale if ua is not None else None, user_weight=w_t, backend=cfg.backend,
                    check_values=False, layout=lay)

    def _prepared_forward(self, x: Tensor) -> Optional[Tensor]:
        """The no-grad forward of a routed stage through a prepared routed_lora call (proper_kernels.prepared):
        the routing, the op's argument checks and the backend's argument conversion happen once per (batch,
        token shape) and every later call (each decode step) runs only the base layer and the kernel, which
        adds into the base output. None where this path does not apply (the general forward then runs)."""
        st = self._state
        stage = st.stage
        if stage == "population" or (self.training and st.cfg.dropout > 0) or "token_router" in self._parameters:
            return None   # (token-level gates follow x: nothing to prepare)
        batch = context.active_batch(st)
        if batch is None or type(x) is not torch.Tensor or torch.compiler.is_compiling() or x.device.type == "meta":
            return None   # the general forward raises the missing-context error / traces the custom op
        d_in = self.in_features
        T = x.numel() // d_in
        if T == 0:
            return None
        nb = x.shape[0] if x.dim() >= 2 else 1
        key = (id(self), stage, context.lora_router_active(st), x.shape, x.device, x.dtype)
        versions = tuple(p._version for p in self._route_params())
        hit = batch.prepared.get(key)
        if hit is None or hit[0] != versions:
            hit = (versions, self._prepare(batch, stage, x, nb))
            batch.prepared[key] = hit
        # x keeps its leading dims (the prepared call and the cpu kernel flatten them): no reshape, no view
        if self.conv1d:
            y = self.base_forward(x.reshape(T, d_in)).view(x.shape[:-1] + (self.out_features,))
        else:
            y = F.linear(x, self.weight, self.bias)
        if hit[1] is not None:   # y += delta (computed in adapter_dtype; the cpu kernel adds it to y in fp32)
            hit[1](x if x.dtype == self.adapter_dtype else x.to(self.adapter_dtype), out=y)
        return y

    def _prepare(self, batch, stage: str, x: Tensor, nb: int) -> Optional[PreparedRoutedLoRA]:
        """The routed_lora call of this layer for this batch and token shape, x left open (None: no delta)."""
        args = self._op_args(batch, stage, x.reshape(-1, self.in_features), nb)
        return None if args is None else prepare_routed_lora(x.to(self.adapter_dtype), **args)

    def _token_routing(self, batch, stage: str, nb: int, per: int, device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Token-level (gates [T, K], w [T]) for this layer; cached in `batch` while gradients are off."""
        if torch.is_grad_enabled():
            return _expand(*self.route_users(batch, batch.sample_ids(nb, device), stage), nb, per)
        # Two cache levels: per-user routing (shared by prefill and decode), then its token expansion.
        versions = tuple(p._version for p in self._route_params())
        ukey = (id(self), stage, context.lora_router_active(self._state), nb, device)
        hit = batch.cache.get(ukey)
        if hit is None or hit[0] != versions:
            hit = (versions, self.route_users(batch, batch.sample_ids(nb, device), stage), context.BoundedCache())
            batch.cache[ukey] = hit
        tok = hit[2].get(per)
        if tok is None:
            tok = hit[2][per] = _expand(*hit[1], nb, per)
        return tok


_ONES: Dict[tuple, Tensor] = {}


def _ones(x: Tensor, T: int) -> Tensor:
    """A [T, 1] gate of ones (the population LoRA as K = 1), reused across layers and steps."""
    key = (T, x.device, x.dtype)
    t = _ONES.get(key)
    if t is None:
        if len(_ONES) > 64:
            _ONES.clear()
        with torch.inference_mode(False):   # a normal tensor: it may be saved for backward later
            t = _ONES[key] = torch.ones(T, 1, device=x.device, dtype=x.dtype)
    return t


def _expand(gates: Optional[Tensor], w: Optional[Tensor], nb: int, per: int):
    """Per-user [nb, K] gates and [nb] weights -> per-token [nb*per, K] and [nb*per] (row-major tokens)."""
    if per != 1:
        if gates is not None:
            gates = gates[:, None, :].expand(nb, per, gates.shape[-1]).reshape(nb * per, -1)
        if w is not None:
            w = w[:, None].expand(nb, per).reshape(nb * per)
    return gates, w
