"""The stage losses (formulas in the package docstring): L_lm, and the group stage's load-balancing and
experts-distinct terms."""
from __future__ import annotations


import torch
import torch.nn.functional as F


from ..context import users
from ..state import get_state, proper_layers

def hidden_states(model, ids, mask, prefix=None):
    """The decoder's last hidden states (the vocabulary projection is applied only where a loss needs it);
    through ``prefix`` (a prefix.FrozenPrefix: the unadapted bottom layers' states cached) where it is usable."""
    if prefix is not None and prefix.usable():
        return prefix.hidden_states(ids, mask)
    dec = model.get_decoder()
    return dec(input_ids=ids, attention_mask=mask).last_hidden_state


def lm_loss(model, batch, prefix=None) -> torch.Tensor:
    """L_lm: mean cross-entropy of the target tokens; logits are formed only at scored positions (the
    vocabulary projection of every position would dominate the cost of a step). ``prefix``: see
    :func:`hidden_states` (scoring only: ignored where gradients are on)."""
    ids, mask, labels, rows = batch
    with users(model, rows):
        h = hidden_states(model, ids, mask, prefix)
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.get_output_embeddings()(h[:, :-1][sel]).float()
    return F.cross_entropy(logits, tgt[sel])


# -------------------------------------------------------------------------------------- group-stage terms
def load_balance_loss(model, rows: torch.Tensor) -> torch.Tensor:
    """L_lb = mean over layers of K * sum_k pbar_k^2 (module docstring)."""
    terms = []
    rows = torch.as_tensor(get_state(model).user_rows(rows.tolist()))   # table rows (slots when paged)
    for layer in proper_layers(model).values():
        r = getattr(layer, "router", None)
        if r is None:
            continue
        p = torch.softmax(r.logits(rows.to(r.embedding.weight.device)).float(), dim=-1)   # [B, K]
        pbar = p.mean(0)
        terms.append(p.shape[-1] * (pbar * pbar).sum())
    return torch.stack(terms).mean() if terms else torch.zeros(())


def expert_cosines(expert_a: torch.Tensor, expert_b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[K, K] cosines between the experts' weight updates dW_k = B_k A_k (Frobenius), via r x r Grams.
    expert_a [K, r, d_in], expert_b [K, d_out, r]."""
    a, b = expert_a.float(), expert_b.float()
    ga = torch.einsum("kri,lsi->klrs", a, a)        # A_k A_l^T
    gb = torch.einsum("kor,los->klrs", b, b)        # B_k^T B_l
    m = (ga * gb).sum((-1, -2))                     # <dW_k, dW_l>_F
    n = m.diagonal().clamp_min(0).sqrt()
    return m / (n[:, None] * n[None, :] + eps)


def distinct_loss(model) -> torch.Tensor:
    """L_div = mean over layers and expert pairs j < k of cos^2(dW_j, dW_k) (module docstring)."""
    terms = []
    for layer in proper_layers(model).values():
        if getattr(layer, "expert_a", None) is None or layer.expert_a.shape[0] < 2:
            continue
        c = expert_cosines(layer.expert_a, layer.expert_b)
        K = c.shape[0]
        iu = torch.triu_indices(K, K, 1)
        terms.append((c[iu[0], iu[1]] ** 2).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())


