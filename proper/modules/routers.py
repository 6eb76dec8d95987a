"""The two PROPER routers. Both work per *user* (one gate vector per sequence), never per token.

Where the user-aware router lives is ProperConfig.router_scope: one for the whole model (default: a user's group
is one assignment shared by every layer), a shared embedding with per-layer heads, or one per layer.

Where the paper's exact formulas are not at hand these are the simplest faithful forms; each is documented
below and sized by ProperConfig (router_dim, lora_router_probes, top_k).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def top_k_gates(probs: Tensor, k: int) -> Tensor:
    """Keep the k largest gates of each row and renormalise them to sum to 1; the rest become exact zeros
    (structural zeros: routed_lora skips those experts).  # [B, K]"""
    K = probs.shape[-1]
    if k <= 0 or k >= K:
        return probs
    vals, idx = probs.topk(k, dim=-1)
    vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals)


class UserAwareRouter(nn.Module):
    """Gates over the K group experts from a learned per-user embedding.

        logits_u = W e_u + b          e_u = embedding[u]  (router_dim)
        gates_u  = top_k(softmax(logits_u + extra_u))      renormalised over the kept experts

    Cold start: a user id of -1 gets the population-average gates, mean_u softmax(logits_u) over every user
    embedding (then top-k), so an unseen user is served by the experts the population relies on most.
    Embeddings start at N(0, init_std^2) and W at N(0, 1/dim), so distinct users start with distinct gates.

    Paged (``paged=True``: the embedding rows are user slots): the average cannot run over every registered user
    on each forward, so it is the buffer ``cold_start`` [K], the mean over the users the store holds (those that
    were trained or imported), set by ``proper.refresh_cold_start(model)`` (the trainer calls it after the group
    stage; it is saved with the model). Until then it is uniform.
    """

    def __init__(self, num_users: int, num_experts: int, dim: int = 32, top_k: int = 0, init_std: float = 1.0,
                 device=None, dtype=None, paged: bool = False, draw_rows: bool = True,
                 shared: Optional["UserAwareRouter"] = None):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        # draw_rows=False (ProperLinear): the model writes each user's seeded row (proper/store/init.py), and
        # nothing is drawn from the global generator here, so the other parameters' draws do not depend on the
        # table's size (dense or slots)
        if shared is None:
            self.embedding = nn.Embedding(num_users, dim,
                                          _weight=torch.zeros(num_users, dim, device=device, dtype=dtype))
        else:   # a head on another router's embedding (router_scope="heads"): a plain reference, not a
            object.__setattr__(self, "_shared", shared)   # submodule, so the table is saved and trained once
            draw_rows = False
        self.proj = nn.Linear(dim, num_experts, device=device, dtype=dtype)
        self.paged = paged
        if paged:
            self.register_buffer("cold_start", torch.full((num_experts,), 1.0 / num_experts, device=device,
                                                          dtype=torch.float32))
        with torch.no_grad():
            if draw_rows:
                self.embedding.weight.normal_(0.0, init_std)
            self.proj.weight.normal_(0.0, 1.0 / math.sqrt(dim))
            self.proj.bias.zero_()

    @property
    def table(self) -> nn.Embedding:
        """The per-user embedding table this router reads (its own, or the shared router's)."""
        shared = self.__dict__.get("_shared")
        return self.embedding if shared is None else shared.embedding

    @property
    def owns_table(self) -> bool:
        return "_shared" not in self.__dict__

    def logits(self, user_ids: Tensor) -> Tensor:
        """Router logits of each user (ids -1 read row 0; callers replace those rows).  # [B, K]"""
        return self.proj(self.table(user_ids.clamp(min=0)))

    def population_probs(self) -> Tensor:
        """Mean of softmax(logits) over every user: the cold-start distribution.  # [K]"""
        if self.paged:
            return self.cold_start
        return torch.softmax(self.proj(self.table.weight), dim=-1).mean(0)

    def forward(self, user_ids: Tensor, extra_logits: Optional[Tensor] = None, cold_start: bool = True) -> Tensor:
        """Gates [B, K] of the users `user_ids` [B]. `extra_logits` [B, K] is added before the softmax (the
        LoRA-aware router's correction). `cold_start=False` promises there is no -1 id (skips the average)."""
        logits = self.logits(user_ids)
        if extra_logits is not None:
            logits = logits + extra_logits
        return self.gates(logits, user_ids, cold_start)

    def gates(self, logits: Tensor, user_ids: Tensor, cold_start: bool = True) -> Tensor:
        """top_k(softmax(logits)) with the cold-start rows (user id -1) replaced: rows of logits [N, K] belong to
        user_ids [N] (users, or tokens with cfg.token_router)."""
        probs = torch.softmax(logits, dim=-1)
        if cold_start:
            probs = torch.where((user_ids < 0)[:, None], self.population_probs().to(probs.dtype)[None], probs)
        return top_k_gates(probs, self.top_k)


class LoRAAwareRouter(nn.Module):
    """A user's group-gate correction and its weight w, derived from that user's own LoRA on this layer.

    The user's LoRA dW_u = s_u B_u A_u is read through P learned probe directions q_p (d_in):

        f_u = flatten(dW_u [q_1 .. q_P])                  (d_out * P: the LoRA's response to the probes)
        [c_u, v_u] = H f_u + h                            (K + 1 outputs)
        gates_u = top_k(softmax(user_aware_logits_u + c_u)),   w_u = 2 sigmoid(v_u)

    H and h start at zero, so the user stage starts exactly where the group stage ended (same gates, w = 1)
    and learns from there. Cost: O(B r (d_in + d_out) P) per forward, computed once per user, not per token.
    """

    def __init__(self, d_in: int, d_out: int, num_experts: int, num_probes: int = 2, device=None, dtype=None):
        super().__init__()
        self.num_experts = num_experts
        self.probes = nn.Parameter(torch.randn(num_probes, d_in, device=device, dtype=dtype) / math.sqrt(d_in))
        self.head = nn.Linear(d_out * num_probes, num_experts + 1, device=device, dtype=dtype)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def features(self, a: Tensor, b: Tensor, ranks: Optional[Tensor], scale: Tensor) -> Tensor:
        """f_u for each user of the batch. a [B, r, d_in], b [B, d_out, r], ranks [B], scale [B].  # [B, d_out*P]"""
        return self._response(a, b, ranks, scale).transpose(1, 2).flatten(1)

    def _response(self, a: Tensor, b: Tensor, ranks: Optional[Tensor], scale: Tensor) -> Tensor:
        """(s_u B_u A_u q_p)^T: the features as [B, P, d_out] (feature (o, p) at [:, p, o])."""
        a, b = a.to(self.probes.dtype), b.to(self.probes.dtype)   # adapters may be stored in another dtype
        if ranks is not None:   # padding may hold anything: zero it before any product (0 * NaN = NaN), by
            keep = torch.arange(a.shape[1], device=a.device)[None, :] < ranks[:, None]   # torch.where, so it also
            a = torch.where(keep[:, :, None], a, 0.0)                                     # gets zero gradient
            b = torch.where(keep[:, None, :], b, 0.0)
        return _ProbeResponse.apply(a, b, self.probes) * scale.to(a.dtype)[:, None, None]

    def forward(self, a: Tensor, b: Tensor, ranks: Optional[Tensor], scale: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        """(gate-logit correction [B, K] or None when K = 0, weight w [B])."""
        # the head reads f in (o, p) order; permuting its [K + 1, d_out * P] weight to (p, o) costs less than
        # permuting the [B, d_out, P] features
        weight = self.head.weight
        weight = weight.view(weight.shape[0], -1, self.probes.shape[0]).transpose(1, 2).flatten(1)
        out = F.linear(self._response(a, b, ranks, scale).flatten(1), weight, self.head.bias)
        w = 2.0 * torch.sigmoid(out[:, -1])
        return (out[:, :-1] if self.num_experts > 0 else None), w


class _ProbeResponse(torch.autograd.Function):
    """Semantics: out[u] = (B_u A_u q^T)^T = z_u^T B_u^T, z_u = A_u q^T; a [B, r, d_in], b [B, d_out, r],
    probes q [P, d_in] -> [B, P, d_out].

    Why a Function: P is 2, and every product autograd derives for `torch.bmm(b, a @ q^T)` has an inner or outer
    dimension of P, where torch's batched GEMM is far from the bandwidth it reaches with d_out innermost. This
    orders each of the four products so. Measured on one layer's 7 SmolLM2 projections, forward + backward with
    gradients: 13.2 against 14.9 ms at 64 users, equal at 16 (the rest is the full [U, r, d] gradients it must
    write; the router is about a tenth of a 64-user x 16-token training step)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, q: Tensor) -> Tensor:
        n, r, d_in = a.shape
        zt = (a.reshape(n * r, d_in) @ q.t()).view(n, r, -1).transpose(1, 2).contiguous()    # [B, P, r]
        ctx.save_for_backward(a, b, q, zt)
        return torch.bmm(zt, b.transpose(1, 2))                                              # [B, P, d_out]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        a, b, q, zt = ctx.saved_tensors
        n, r, d_in = a.shape
        g = g.contiguous()
        gb = torch.bmm(g.transpose(1, 2), zt) if ctx.needs_input_grad[1] else None            # [B, d_out, r]
        gz = torch.bmm(g, b).transpose(1, 2).reshape(n * r, -1)                               # [B * r, P]
        ga = (gz @ q).view(n, r, d_in) if ctx.needs_input_grad[0] else None
        gq = gz.t() @ a.reshape(n * r, d_in) if ctx.needs_input_grad[2] else None
        return ga, gb, gq
