"""The three-stage PROPER trainer (``proper train``): population -> group -> user, all in mixed-user batches.

Stages (each one ``set_stage`` of the same patched model, so every stage runs through ``routed_lora``):

population  one LoRA (the op with K = 1, gate 1) trained on every user's history.
group       K experts copied from the population LoRA (``set_stage``'s ``init_experts``) and trained together
            with the user-aware router (a learned per-user embedding -> softmax over K, optional top-k; one gate
            vector per user, broadcast to all of that user's tokens).
user        experts and user-aware router frozen; every user's LoRA and the LoRA-aware router trained together
            in mixed-user batches (one forward per batch whatever users it holds; never a per-user loop).

Losses (simplest faithful forms; coefficients configurable, see :class:`TrainConfig`):

    L_lm   = mean over target tokens of -log p(target token | prompt, earlier target tokens)
             (prompt tokens and padding are not scored)
    L_pop  = L_lm
    L_grp  = L_lm + lb_coef * L_lb + distinct_coef * L_div
        L_lb  = mean over layers of  K * sum_k pbar_k^2,  pbar_k = mean over the batch's sequences of the
                user-aware router's softmax probability of expert k (before top-k). It is 1 when the batch
                uses the experts evenly and K when every user picks the same one (a soft form of the Switch
                Transformer load-balancing loss; with per-user gates "tokens" are users).
        L_div = mean over layers and expert pairs j < k of cos^2(dW_j, dW_k), dW_k = B_k A_k, the cosine taken
                between the experts' full weight updates via the r x r Gram identity
                <B_j A_j, B_k A_k>_F = sum((A_j A_k^T) * (B_j^T B_k)), so no d_out x d_in matrix is formed.
                0 when the experts' updates are orthogonal, 1 when they coincide (as at the start of the stage,
                where the gradient is zero; the per-user gates break the symmetry through L_lm).
    L_usr  = L_lm

Cold start: an unknown user (id -1) gets no user LoRA and the population-average gates (the layer's rule).

Routers live in every adapted layer (proper.layer: each ProperLinear has its own user-aware router and
LoRA-aware router), so a user's "group assignment" is reported as its gates averaged over the layers (top
group = argmax, entropy of that average), next to the mean of the per-layer entropies. The LoRA-aware
router's head starts at zero and reads the user LoRAs, whose B starts at zero: its gradient is exactly zero
at the first user-stage step and non-zero from the second on.

Batches: each step draws ``batch_size`` training examples with a generator seeded by (seed, stage, step)
(uniform over examples, or ``sampling="user"``: a uniform user, then one of its examples), so batches mix
users and a resumed run sees the same batches as an uninterrupted one.

Each stage: tqdm progress, dev loss every ``eval_every`` steps (and before the first step), early stopping
after ``patience`` evaluations without improvement with the best dev weights restored at the end, an atomic
checkpoint at every evaluation (``save_pretrained`` + optimizer/early-stopping state), so ``--resume`` loses at
most one interval and reproduces the same losses, and metrics written as JSON:

    OUT/metrics.json            {"systems": {NAME: {"mae", "rmse", "mae_expected", "rmse_expected", "n",
                                 "buckets": {PROFILE-SIZE: {...}}}}, "stages": ..., "groups": ..., "data": ...}
    OUT/history.json            per-step losses and dev evaluations of each stage
    OUT/group_assignments.json  per-user gates (mean over layers), top group and entropy, after group and user
    OUT/predictions.json        every system's per-example test predictions (paired comparisons, bootstrap CIs)
    OUT/stages/<stage>/         the model after each stage (save_pretrained; proper.from_pretrained loads it)
    OUT/checkpoints/            the latest resumable checkpoint (latest.json points at it)
    OUT/ablations/<name>/       the trained ablations' own checkpoints and progress

Systems (rating data): user_mean (the user's mean training rating), item_mean (the item's mean training
rating over the selected users, the global mean for unseen items), base (the untouched model), population,
group, proper, proper_cold_start (every test user treated as unknown), and two trained ablations of the user
stage, each a second copy of the model that starts from this run's frozen parts and trains the user LoRAs on
the same batches: population+user (no groups: the population LoRA plus each user's LoRA, added with w = 1)
and proper_no_lora_router (the experts and user-aware router, user LoRAs added with w = 1, no LoRA-aware
router). proper_router_off_at_inference is the trained PROPER model with its LoRA-aware router switched off
at inference only. LLM systems predict the argmax over the five rating tokens ("mae", "rmse") and the
expectation under their renormalised probabilities ("mae_expected", "rmse_expected"). Metrics
come from scikit-learn (MAE/RMSE) and rouge-score (ROUGE-1/L, generation data).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from . import distributed as DD
from .io import atomic_write

log = logging.getLogger("proper.train")

STAGES = ("population", "group", "user")
ABLATIONS = ("population+user", "proper_no_lora_router")

# ------------------------------------------------------------------------------------------------ config
#: Presets. "default" is sized for ~30 minutes on a quiet 2-core CPU with SmolLM2-135M (30 layers, fp32): a
#: seeded random subset of 64 users (data.select_users: uniform, so the profile-size distribution is kept;
#: 128 test ratings), LoRAs on the FFN projections of the top 10 layers (lora_layers: backward then stops
#: there), 400/150/200 steps of 8 examples for the three stages plus 200 for each trained ablation. Measured
#: per step on that machine: ~1.1 s (population), ~1 s (user); the user LoRAs train at lr/3 (at lr they
#: overfit within ~20 steps in a first 32-user run: dev loss rose while the training probe loss rose too).
#: "tiny" is a minutes-long smoke run (4 users, 6 steps a stage and per ablation, LoRAs on the top 2 layers).
BUDGETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(max_users=4, batch_size=4, steps_population=6, steps_group=6, steps_user=6, eval_every=3,
                 patience=3, num_experts=2, top_k=0, expert_rank=4, user_rank=2, dev_max=4, test_max=None,
                 max_len=128, lr=2e-3, user_lr=None, router_lr=2e-2, lora_layers=2),
    "default": dict(max_users=64, batch_size=8, steps_population=400, steps_group=150, steps_user=200,
                    eval_every=50, patience=3, num_experts=4, top_k=2, expert_rank=8, user_rank=4, dev_max=64,
                    test_max=None, max_len=128, lr=1e-3, user_lr=3e-4, router_lr=1e-2, lora_layers=10),
}


@dataclass
class TrainConfig:
    """Everything ``proper train`` takes. ``None`` fields come from the ``budget`` preset (:data:`BUDGETS`)."""

    data: str = "movielens-100k"
    out: str = "runs/proper"
    budget: str = "default"
    seed: int = 0
    max_users: Any = None              # int or "all"
    batch_size: Optional[int] = None
    steps_population: Optional[int] = None
    steps_group: Optional[int] = None
    steps_user: Optional[int] = None
    eval_every: Optional[int] = None   # steps between dev evaluations (and checkpoints)
    patience: Optional[int] = None     # evaluations without dev improvement before stopping the stage
    num_experts: Optional[int] = None
    top_k: Optional[int] = None
    expert_rank: Optional[int] = None
    user_rank: Optional[int] = None
    alpha: float = 16.0
    target_modules: Tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    lora_layers: Any = None            # adapt only the top N decoder layers; 0 or "all": every layer
    lr: Optional[float] = None         # LoRA learning rate (AdamW, constant, no weight decay)
    user_lr: Optional[float] = None    # the user LoRAs' learning rate in the user stage (None: lr)
    router_lr: Optional[float] = None  # routers' learning rate
    lb_coef: float = 0.01              # load-balancing term of the group loss
    distinct_coef: float = 0.01        # experts-distinct term of the group loss
    max_len: Optional[int] = None      # prompt + target tokens; longer prompts lose their start
    dev_max: Optional[int] = None      # dev examples scored per evaluation (None: all)
    test_max: Optional[int] = None     # test examples scored per system (None: all)
    max_history: Optional[int] = None  # train on each user's latest N history examples only (None: all)
    eval_batch_size: int = 16
    sampling: str = "example"          # "example": uniform over training examples; "user": user, then example
    grad_clip: float = 1.0
    backend: str = "auto"
    resume: bool = False
    num_layers: Optional[int] = None   # keep only the first N decoder layers (tests and smoke runs)
    stop_after: Optional[str] = None   # "STAGE:STEP": stop there as if interrupted (tests of --resume)
    max_new_tokens: int = 32           # generation data: tokens generated per test example
    ablations: Tuple[str, ...] = ("population+user", "proper_no_lora_router")   # trained user-stage ablations

    def resolved(self) -> "TrainConfig":
        if self.budget not in BUDGETS:
            raise ValueError(f"--budget must be one of {sorted(BUDGETS)}, got {self.budget!r}")
        preset = BUDGETS[self.budget]
        vals = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in preset.items():
            if vals.get(k) is None:
                vals[k] = v
        cfg = TrainConfig(**vals)
        cfg.target_modules = tuple(cfg.target_modules)
        for name in ("batch_size", "eval_every", "patience", "expert_rank", "user_rank", "max_len"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        for name in ("steps_population", "steps_group", "steps_user", "num_experts", "top_k"):
            if int(getattr(cfg, name)) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
        cfg.ablations = tuple(cfg.ablations)
        bad = [a for a in cfg.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"--ablations: unknown {bad}; known: {ABLATIONS}")
        if cfg.sampling not in ("example", "user"):
            raise ValueError(f"--sampling must be 'example' or 'user', got {cfg.sampling!r}")
        if cfg.stop_after is not None:
            st, _, step = cfg.stop_after.partition(":")
            if st not in STAGES or not step.isdigit():
                raise ValueError(f"--stop-after must be STAGE:STEP with STAGE in {STAGES}, got {cfg.stop_after!r}")
        return cfg

    def steps(self, stage: str) -> int:
        return int(getattr(self, f"steps_{stage}"))


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after`` (a simulated interruption; the run resumes with ``resume=True``)."""


# ----------------------------------------------------------------------------------------------- helpers
def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)

    atomic_write(path, write)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _step_seed(seed: int, stage: str, step: int) -> int:
    """A seed that depends only on (seed, stage, step): batches and any randomness of a step are the same
    whether the run went straight through or resumed from a checkpoint."""
    return (seed * 1_000_003 + STAGES.index(stage) * 100_003 + step) % (2 ** 31)


def load_model(num_layers: Optional[int] = None):
    """(SmolLM2-135M-Instruct, tokenizer) from the pip-shipped GGUF (no hub); optionally truncated to the first
    ``num_layers`` decoder layers (a faster stand-in for tests)."""
    from .models import load_smollm2

    model, tok = load_smollm2()
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model, tok


def truncate_layers(model, n: int) -> None:
    """Keep the first ``n`` decoder layers of a Llama-style model (in place)."""
    dec = model.get_decoder()
    if not hasattr(dec, "layers") or n < 1 or n > len(dec.layers):
        raise ValueError(f"num_layers must be in [1, {len(getattr(dec, 'layers', []))}], got {n}")
    dec.layers = dec.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


def target_modules(model, names: Sequence[str], top_layers) -> Any:
    """``names`` as ProperConfig.target_modules, restricted to the top ``top_layers`` decoder layers (a regex,
    full match, e.g. ``(.*\\.)?layers\\.(20|...|29)\\.(.*\\.)?(gate_proj|up_proj|down_proj)``); all layers
    when ``top_layers`` is None, 0 or "all"."""
    import re

    if top_layers in (None, 0, "all"):
        return tuple(names)
    n = len(model.get_decoder().layers)
    k = int(top_layers)
    if k < 0:
        raise ValueError(f"--lora-layers must be >= 0 or 'all', got {top_layers!r}")
    idx = "|".join(str(i) for i in range(max(0, n - k), n))
    return rf"(.*\.)?layers\.({idx})\.(.*\.)?({'|'.join(re.escape(t) for t in names)})"


# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """Token ids of one example: ``ids = prompt + target``; ``n_prompt`` tokens of it are the prompt."""

    ids: List[int]
    n_prompt: int
    row: int          # user row (LoRA slot), -1 = unknown user


def encode(tokenizer, examples: Sequence[D.Example], rows: Sequence[int], max_len: int,
           add_eos: bool) -> List[Encoded]:
    """Prompt and target tokenised separately (so the target tokens are exactly the target's), the prompt cut
    from the left when prompt + target exceed ``max_len``; ``add_eos`` appends the EOS token to the target."""
    if not examples:
        return []
    p_ids = tokenizer([ex.input for ex in examples], add_special_tokens=False)["input_ids"]
    t_ids = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for ex, p, t, r in zip(examples, p_ids, t_ids, rows):
        t = list(t) + ([eos] if add_eos and eos is not None else [])
        t = t[: max(1, max_len - 1)]
        p = list(p)[-max(1, max_len - len(t)):]
        out.append(Encoded(p + t, len(p), int(r)))
    return out


def collate(items: Sequence[Encoded], pad_id: int, prompt_only: bool = False):
    """Right-padded ``input_ids`` / ``attention_mask`` [B, L], ``labels`` [B, L] (-100 except target tokens),
    ``rows`` [B]. ``prompt_only`` keeps just the prompts (for scoring the next token)."""
    seqs = [it.ids[: it.n_prompt] if prompt_only else it.ids for it in items]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, it) in enumerate(zip(seqs, items)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        if not prompt_only:
            labels[i, it.n_prompt: len(s)] = torch.tensor(s[it.n_prompt:])
    return ids, mask, labels, torch.tensor([it.row for it in items], dtype=torch.long)


def _hidden(model, ids, mask):
    dec = model.get_decoder()
    return dec(input_ids=ids, attention_mask=mask).last_hidden_state


def lm_loss(model, batch) -> torch.Tensor:
    """L_lm: mean cross-entropy of the target tokens; logits are formed only at scored positions (the
    vocabulary projection of every position would dominate the cost of a step)."""
    import proper

    ids, mask, labels, rows = batch
    with proper.users(model, rows):
        h = _hidden(model, ids, mask)
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.get_output_embeddings()(h[:, :-1][sel]).float()
    return F.cross_entropy(logits, tgt[sel])


# -------------------------------------------------------------------------------------- group-stage terms
def load_balance_loss(model, rows: torch.Tensor) -> torch.Tensor:
    """L_lb = mean over layers of K * sum_k pbar_k^2 (module docstring)."""
    import proper

    terms = []
    for layer in proper.proper_layers(model).values():
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
    import proper

    terms = []
    for layer in proper.proper_layers(model).values():
        if getattr(layer, "expert_a", None) is None or layer.expert_a.shape[0] < 2:
            continue
        c = expert_cosines(layer.expert_a, layer.expert_b)
        K = c.shape[0]
        iu = torch.triu_indices(K, K, 1)
        terms.append((c[iu[0], iu[1]] ** 2).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score_next_token(model, items: Sequence[Encoded], pad_id: int, batch_size: int,
                     candidate_ids: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
    """For each example, the distribution of the first target token after its prompt.

    Returns ``nll`` (full-vocabulary -log p of the true first target token) and, with ``candidate_ids``,
    ``probs`` [N, C] renormalised over the candidates (the rating tokens)."""
    import proper

    was = model.training
    model.eval()
    nll, probs = [], []
    items = DD.shard(items)   # each rank scores its slice; gathered back in order below
    try:
        for s in range(0, len(items), batch_size):
            chunk = items[s: s + batch_size]
            ids, mask, _, rows = collate(chunk, pad_id, prompt_only=True)
            with proper.users(model, rows):
                h = _hidden(model, ids, mask)
            last = h[torch.arange(len(chunk)), mask.sum(1) - 1]
            logits = model.get_output_embeddings()(last).float()
            tgt = torch.tensor([it.ids[it.n_prompt] for it in chunk])
            nll.append(-torch.log_softmax(logits, -1).gather(1, tgt[:, None])[:, 0])
            if candidate_ids is not None:
                probs.append(torch.softmax(logits[:, list(candidate_ids)], -1))
    finally:
        model.train(was)
    out = {"nll": np.asarray(DD.gather_sharded(torch.cat(nll).tolist() if nll else []), dtype=np.float64)}
    if candidate_ids is not None:
        rows = DD.gather_sharded(torch.cat(probs).tolist() if probs else [])
        out["probs"] = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(candidate_ids))
    return out


@torch.no_grad()
def mean_lm_loss(model, items: Sequence[Encoded], pad_id: int, batch_size: int) -> float:
    """L_lm averaged over all target tokens of ``items`` (no gradients)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    items = DD.shard(items)
    try:
        for s in range(0, len(items), batch_size):
            b = collate(items[s: s + batch_size], pad_id)
            k = int((b[2][:, 1:] != -100).sum())
            tot += float(lm_loss(model, b)) * k
            n += k
    finally:
        model.train(was)
    tot, n = DD.all_reduce_sum([tot, n])
    return tot / max(n, 1)


def rating_metrics(y_true: Sequence[float], y_pred: Sequence[float], sizes: Sequence[int],
                   y_expected: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """MAE/RMSE (scikit-learn), overall and per profile-size bucket (data.profile_bucket)."""
    from sklearn.metrics import mean_absolute_error, root_mean_squared_error

    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)

    def block(idx):
        d = {"mae": float(mean_absolute_error(y_true[idx], y_pred[idx])),
             "rmse": float(root_mean_squared_error(y_true[idx], y_pred[idx])), "n": int(len(idx))}
        if y_expected is not None:
            ye = np.asarray(y_expected, float)
            d["mae_expected"] = float(mean_absolute_error(y_true[idx], ye[idx]))
            d["rmse_expected"] = float(root_mean_squared_error(y_true[idx], ye[idx]))
        return d

    out = block(np.arange(len(y_true)))
    buckets: Dict[str, List[int]] = {}
    for i, s in enumerate(sizes):
        buckets.setdefault(D.profile_bucket(s), []).append(i)
    out["buckets"] = {b: block(np.asarray(buckets[b])) for b in D.BUCKET_ORDER if b in buckets}
    return out


def rouge_metrics(refs: Sequence[str], preds: Sequence[str], sizes: Sequence[int]) -> Dict[str, Any]:
    """ROUGE-1 / ROUGE-L F1 (rouge-score, stemmed), overall and per profile-size bucket."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = [], []
    for r, p in zip(refs, preds):
        s = sc.score(r, p)
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    r1, rl = np.asarray(r1), np.asarray(rl)

    def block(idx):
        return {"rouge1": float(r1[idx].mean()), "rougeL": float(rl[idx].mean()), "n": int(len(idx))}

    out = block(np.arange(len(r1)))
    buckets: Dict[str, List[int]] = {}
    for i, s in enumerate(sizes):
        buckets.setdefault(D.profile_bucket(s), []).append(i)
    out["buckets"] = {b: block(np.asarray(v)) for b, v in buckets.items()}
    return out


def classic_baselines(dataset: D.Dataset, test: Sequence[D.Example],
                      predictions: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """user_mean and item_mean on the test examples (rating data only); see the module docstring. Their
    per-example predictions go into ``predictions[name]["pred"]`` when a dict is given."""
    train = dataset.examples("train")
    glob = float(np.mean([float(ex.target) for ex in train]))
    by_user: Dict[str, List[float]] = {}
    by_item: Dict[Any, List[float]] = {}
    for ex in train:
        by_user.setdefault(ex.user, []).append(float(ex.target))
        if "item" in ex.meta:
            by_item.setdefault(ex.meta["item"], []).append(float(ex.target))
    y = [float(ex.target) for ex in test]
    sizes = [dataset.users[ex.user].profile_size for ex in test]
    preds = {"user_mean": [float(np.mean(by_user.get(ex.user, [glob]))) for ex in test]}
    if by_item:
        preds["item_mean"] = [float(np.mean(by_item[ex.meta.get("item")])) if ex.meta.get("item") in by_item
                              else glob for ex in test]
    out = {name: rating_metrics(y, p, sizes) for name, p in preds.items()}
    if by_item:
        out["item_mean"]["unseen_items"] = sum(ex.meta.get("item") not in by_item for ex in test)
    if predictions is not None:
        predictions.update({name: {"pred": p} for name, p in preds.items()})
    return out


# -------------------------------------------------------------------------------------------- the trainer
def user_gates(model, rows: torch.Tensor, stage: str) -> Optional[np.ndarray]:
    """[L, U, K] gates of each user in each layer as the ``stage`` routes them (None without experts)."""
    from .routing import user_gates as gates

    g = gates(model, rows, stage)
    return None if g is None else g.numpy()


def group_report(gates: np.ndarray, users: Sequence[str]) -> Dict[str, Any]:
    """Per-user gates (mean over layers), top group and entropy (nats), plus a summary."""
    mean = gates.mean(0)                                          # [U, K]
    ent = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(-1)
    layer_ent = -(gates * np.log(np.clip(gates, 1e-12, None))).sum(-1).mean(0)
    K = mean.shape[-1]
    top = mean.argmax(-1)
    per_user = {u: {"gates": [round(float(v), 5) for v in mean[i]], "group": int(top[i]),
                    "entropy": float(ent[i]), "mean_layer_entropy": float(layer_ent[i])}
                for i, u in enumerate(users)}
    return {"num_experts": K, "max_entropy": math.log(K), "mean_entropy": float(ent.mean()),
            "mean_layer_entropy": float(layer_ent.mean()),
            "group_sizes": [int((top == k).sum()) for k in range(K)], "users": per_user}


class Trainer:
    """Runs the three stages on one patched model; see the module docstring for what it writes."""

    def __init__(self, cfg: TrainConfig, dataset: D.Dataset, model, tokenizer, *, progress: bool = True):
        self.cfg, self.ds, self.model, self.tok = cfg, dataset, model, tokenizer
        self.out = Path(cfg.out)
        self.progress = progress
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rating = dataset.task == "rating"
        self.rating_ids = D.rating_token_ids(tokenizer) if self.rating else None
        index = dataset.user_index()
        add_eos = not self.rating

        def enc(exs, known=True):
            return encode(tokenizer, exs, [index[ex.user] if known else -1 for ex in exs], cfg.max_len, add_eos)

        hist = [s.train[-cfg.max_history:] if cfg.max_history else s.train for s in dataset.users.values()]
        self.train_items = enc([ex for h in hist for ex in h])
        self.by_user: List[List[int]] = []
        pos = 0
        for h in hist:
            self.by_user.append(list(range(pos, pos + len(h))))
            pos += len(h)
        dev = _spread(dataset.examples("dev"), cfg.dev_max)
        self.dev_items = enc(dev)
        self.test_examples = _spread(dataset.examples("test"), cfg.test_max)
        self.test_items = enc(self.test_examples)
        self.test_cold = enc(self.test_examples, known=False)
        # a fixed probe of training examples (the first of each user, then the second, ...) for the
        # "loss falls" record of each stage
        probe = []
        for j in range(2):
            probe += [ids[j] for ids in self.by_user if len(ids) > j]
        self.probe_items = [self.train_items[i] for i in probe[: max(8, 2 * cfg.batch_size)]]
        self.sizes = [dataset.users[ex.user].profile_size for ex in self.test_examples]
        self.progress_path = self.out / "progress.json"
        self.state: Dict[str, Any] = {"systems": {}, "stages": {}, "history": {}, "groups": {}, "predictions": {}}

    # ------------------------------------------------------------------------------ batches
    def batch(self, stage: str, step: int):
        rng = np.random.default_rng(_step_seed(self.cfg.seed, stage, step))
        bs = self.cfg.batch_size
        if self.cfg.sampling == "user":
            us = rng.integers(0, len(self.by_user), bs)
            idx = [self.by_user[u][rng.integers(0, len(self.by_user[u]))] for u in us]
        else:
            idx = rng.integers(0, len(self.train_items), bs).tolist()
        # the global batch is the same on every rank; each rank trains on its slice (proper.distributed)
        return collate([self.train_items[i] for i in DD.shard(idx)], self.pad)

    # ------------------------------------------------------------------------------ evaluation
    def dev_loss(self) -> Dict[str, float]:
        if self.rating:
            s = score_next_token(self.model, self.dev_items, self.pad, self.cfg.eval_batch_size, self.rating_ids)
            pred = s["probs"].argmax(-1) + 1
            true = np.array([self.rating_ids.index(it.ids[it.n_prompt]) + 1 for it in self.dev_items])
            return {"dev_loss": float(s["nll"].mean()), "dev_mae": float(np.abs(pred - true).mean())}
        return {"dev_loss": mean_lm_loss(self.model, self.dev_items, self.pad, self.cfg.eval_batch_size)}

    def evaluate_system(self, name: str, cold: bool = False) -> Dict[str, Any]:
        items = self.test_cold if cold else self.test_items
        t0 = time.time()
        if self.rating:
            s = score_next_token(self.model, items, self.pad, self.cfg.eval_batch_size, self.rating_ids)
            probs = s["probs"]
            y = [float(ex.target) for ex in self.test_examples]
            pred, expected = probs.argmax(-1) + 1, probs @ np.arange(1, 6)
            res = rating_metrics(y, pred, self.sizes, expected)
            res["nll"] = float(s["nll"].mean())
            self.state.setdefault("predictions", {})[name] = {"pred": pred.tolist(),
                                                              "expected": [round(float(v), 5) for v in expected]}
        else:
            from .generate import generate_for_users

            pairs = DD.shard([(it.row, ex.input) for it, ex in zip(items, self.test_examples)])
            preds = generate_for_users(self.model, self.tok, pairs, max_new_tokens=self.cfg.max_new_tokens,
                                       batch_size=self.cfg.eval_batch_size) if pairs else []
            preds = DD.gather_sharded(preds)
            res = rouge_metrics([ex.target for ex in self.test_examples], [p.strip() for p in preds], self.sizes)
            self.state.setdefault("predictions", {})[name] = {"pred": [p.strip() for p in preds]}
        res["seconds"] = round(time.time() - t0, 2)
        self.state["systems"][name] = res
        log.info("%s: %s", name, _fmt_system(res))
        return res

    # ------------------------------------------------------------------------------ checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self, stage: str, step: int, finished: bool, opt, es: Dict[str, Any]) -> None:
        """Atomic: a new folder is written completely, then latest.json is replaced to point at it, then the
        older folders are removed. A crash at any point leaves a complete checkpoint that latest.json names."""
        import proper

        if not DD.is_main():
            DD.barrier()   # rank 0 writes; the others wait so that a resume sees a complete checkpoint
            return
        root = self._ckpt_root()
        root.mkdir(parents=True, exist_ok=True)
        name = f"{stage}-{step:06d}{'-done' if finished else ''}"
        d = root / name
        if d.exists():
            shutil.rmtree(d)
        tmp = root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        proper.save_pretrained(self.model, tmp)
        _atomic_torch_save({"stage": stage, "step": step, "finished": finished,
                            "optimizer": None if opt is None else opt.state_dict(), "early_stopping": es},
                           tmp / "trainer_state.pt")
        os.replace(tmp, d)
        self._save_progress()
        _atomic_json(root / "latest.json", {"stage": stage, "step": step, "finished": finished, "dir": name})
        for old in root.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        DD.barrier()

    def _save_progress(self) -> None:
        if DD.is_main():
            _atomic_json(self.progress_path, self.state)

    # ------------------------------------------------------------------------------ a stage
    def _optimizer(self, stage: str):
        groups: Dict[str, List[torch.nn.Parameter]] = {"lora": [], "router": []}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups["router" if "router." in name else "lora"].append(p)
        lr = self.cfg.user_lr if (stage == "user" and self.cfg.user_lr) else self.cfg.lr
        params = [{"params": groups["lora"], "lr": lr},
                  {"params": groups["router"], "lr": self.cfg.router_lr}]
        return torch.optim.AdamW([g for g in params if g["params"]], weight_decay=0.0)

    def _trainable_named(self) -> Dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def stage_loss(self, stage: str, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        lm = lm_loss(self.model, batch)
        parts = {"lm": float(lm.detach())}
        loss = lm
        if stage == "group":
            lb = load_balance_loss(self.model, batch[3])
            div = distinct_loss(self.model)
            loss = lm + self.cfg.lb_coef * lb + self.cfg.distinct_coef * div
            parts.update(lb=float(lb.detach()), div=float(div.detach()))
        parts["loss"] = float(loss.detach())
        return loss, parts

    def run_stage(self, stage: str, resume: Optional[Dict[str, Any]] = None) -> None:
        import proper

        cfg = self.cfg
        proper.set_stage(self.model, stage)
        self.model.train()
        steps = cfg.steps(stage)
        opt = self._optimizer(stage)
        named = self._trainable_named()
        hist = self.state["history"].setdefault(stage, {"steps": [], "evals": []})
        info = self.state["stages"].setdefault(stage, {})
        t_start = time.time()
        if resume is not None:
            opt.load_state_dict(resume["optimizer"])
            es = resume["early_stopping"]
            es["best"] = {k: v.clone() for k, v in es["best"].items()}
            start = resume["step"] + 1
            # the history written after the checkpoint was taken is discarded, so it matches the weights
            hist["steps"] = [h for h in hist["steps"] if h["step"] < start]
            hist["evals"] = [h for h in hist["evals"] if h["step"] < start]
            log.info("%s: resuming at step %d", stage, start)
        else:
            info.update(probe_loss_start=mean_lm_loss(self.model, self.probe_items, self.pad, cfg.eval_batch_size))
            d0 = self.dev_loss()
            hist["evals"].append({"step": -1, **d0})
            es = {"best_loss": d0["dev_loss"], "best_step": -1, "bad": 0, "stopped": False,
                  "best": {k: p.detach().clone() for k, p in named.items()}}
            start = 0
        stop_stage, stop_step = (cfg.stop_after.split(":") + [None])[:2] if cfg.stop_after else (None, None)
        bar = _tqdm(total=steps, initial=start, desc=stage, disable=not self.progress)
        last = start - 1   # the last step run
        try:
            for step in range(start, steps):
                if es["stopped"]:
                    break
                last = step
                torch.manual_seed(_step_seed(cfg.seed, stage, step))
                loss, parts = self.stage_loss(stage, self.batch(stage, step))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                DD.average_gradients(list(named.values()))
                if DD.world_size() > 1:   # log the mean over the ranks' slices
                    parts = dict(zip(parts, (v / DD.world_size() for v in DD.all_reduce_sum(parts.values()))))
                gn = torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.grad_clip)
                if stage != "population":
                    parts["router_grad_norm"] = _grad_norm([p for n, p in named.items() if "router." in n])
                parts["grad_norm"] = float(gn)
                opt.step()
                hist["steps"].append({"step": step, **parts})
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.4f}")
                if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
                    d = self.dev_loss()
                    hist["evals"].append({"step": step, **d})
                    if d["dev_loss"] < es["best_loss"] - 1e-4:
                        es.update(best_loss=d["dev_loss"], best_step=step, bad=0,
                                  best={k: p.detach().clone() for k, p in named.items()})
                    else:
                        es["bad"] += 1
                        if es["bad"] >= cfg.patience:
                            es["stopped"] = True
                            log.info("%s: early stop at step %d (best dev loss %.4f at step %d)", stage, step,
                                     es["best_loss"], es["best_step"])
                    self.save_checkpoint(stage, step, False, opt, es)
                if stop_stage == stage and step == int(stop_step):
                    raise TrainingInterrupted(f"stopped after {stage} step {step} (--stop-after)")
        finally:
            bar.close()
        info.update(steps_run=last + 1, steps=steps, best_step=es["best_step"], best_dev_loss=es["best_loss"],
                    stopped_early=bool(es["stopped"]),
                    seconds=round(info.get("seconds", 0.0) + time.time() - t_start, 2))
        info["probe_loss_end"] = mean_lm_loss(self.model, self.probe_items, self.pad, cfg.eval_batch_size)
        if es["best_step"] == last:
            info["probe_loss_best"] = info["probe_loss_end"]
        else:
            with torch.no_grad():   # the best dev weights
                for k, p in named.items():
                    p.copy_(es["best"][k])
            info["probe_loss_best"] = mean_lm_loss(self.model, self.probe_items, self.pad, cfg.eval_batch_size)
        if info["probe_loss_end"] >= info["probe_loss_start"]:
            log.warning("%s: the training probe loss did not fall (%.4f -> %.4f)", stage, info["probe_loss_start"],
                        info["probe_loss_end"])

    def after_stage(self, stage: str) -> None:
        """Evaluate the systems this stage makes and log group assignments; save the stage's model."""
        import proper

        rows = torch.arange(len(self.ds))
        if stage == "population":
            self.evaluate_system("population")
        elif stage == "group":
            self.evaluate_system("group")
            g = user_gates(self.model, rows, "group")
            if g is not None:
                self.state["groups"]["group"] = group_report(g, self.ds.user_list)
        else:
            self.evaluate_system("proper")
            if proper.proper_layers(self.model) and _cfg(self.model).lora_router:
                with proper.lora_router_disabled(self.model):
                    self.evaluate_system("proper_router_off_at_inference")
            self.evaluate_system("proper_cold_start", cold=True)
            g = user_gates(self.model, rows, "user")
            if g is not None:
                self.state["groups"]["user"] = group_report(g, self.ds.user_list)
        if DD.is_main():
            proper.save_pretrained(self.model, self.out / "stages" / stage)


def ablation_config(name: str, main):
    """The ProperConfig of an ablation model, derived from the main run's config ``main``."""
    if name == "population+user":
        return dataclasses.replace(main, num_experts=0, top_k=0, population_rank=main.pop_rank, lora_router=False)
    if name == "proper_no_lora_router":
        return dataclasses.replace(main, lora_router=False)
    raise ValueError(f"unknown ablation {name!r}; known: {ABLATIONS}")


@torch.no_grad()
def copy_frozen_parts(src, dst) -> List[str]:
    """Copy the population LoRA, experts and user-aware routers of ``src`` into the same-named tensors of
    ``dst`` (both patched models of the same base); returns the copied keys."""
    from .io import proper_state_dict

    s, d = proper_state_dict(src), proper_state_dict(dst)
    keys = [k for k in d if k in s and (".population_" in k or ".expert_" in k or ".router." in k)]
    for k in keys:
        d[k].copy_(s[k])
    return keys


def run_ablation(name: str, main: "Trainer", loader: Callable[[], Tuple[Any, Any]]) -> Dict[str, Any]:
    """Train the ablation ``name`` (see the module docstring) on a second copy of the base model: the main
    run's frozen parts copied in, then the user stage on the same batches, with its own checkpoints under
    OUT/ablations/NAME (so --resume continues it too). Returns its test metrics."""
    import proper

    cfg = dataclasses.replace(main.cfg, out=str(main.out / "ablations" / name), stop_after=None)
    model, tok = loader()
    latest = Path(cfg.out) / "checkpoints" / "latest.json"
    resume_state = None
    if main.cfg.resume and latest.is_file():
        ck = Path(cfg.out) / "checkpoints" / json.loads(latest.read_text())["dir"]
        proper.from_pretrained(model, ck)
        resume_state = torch.load(ck / "trainer_state.pt", map_location="cpu", weights_only=False)
    else:
        proper.apply_proper(model, ablation_config(name, _cfg(main.model)))
        copy_frozen_parts(main.model, model)
        _broadcast_adapters(model)
    tr = Trainer(cfg, main.ds, model, tok, progress=main.progress)
    if resume_state is not None and tr.progress_path.is_file():
        tr.state = json.loads(tr.progress_path.read_text())
    if resume_state is None or not resume_state["finished"]:
        if cfg.steps("user"):
            tr.run_stage("user", resume=resume_state)
        else:
            proper.set_stage(model, "user")
        tr.save_checkpoint("user", cfg.steps("user"), True, None, {})
    res = tr.evaluate_system(name)
    main.state["stages"][name] = tr.state["stages"].get("user", {})
    main.state["history"][name] = tr.state["history"].get("user", {})
    main.state["systems"][name] = res
    main.state.setdefault("predictions", {})[name] = tr.state.get("predictions", {}).get(name)
    main._save_progress()
    return res


def _broadcast_adapters(model) -> None:
    """Under data parallelism, start every rank from rank 0's freshly initialised adapters and routers."""
    from .io import proper_state_dict

    DD.broadcast_parameters(list(proper_state_dict(model).values()))


def _cfg(model):
    from .patch import get_state

    return get_state(model).cfg


def _grad_norm(params) -> float:
    gs = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(gs).norm()) if gs else 0.0


def _spread(items: Sequence, n: Optional[int]) -> List:
    """At most n items spread evenly over the list (all when n is None)."""
    items = list(items)
    if n is None or len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(mininterval=1.0, **kw)


def _fmt_system(r: Dict[str, Any]) -> str:
    if "mae" in r:
        s = f"MAE {r['mae']:.4f}  RMSE {r['rmse']:.4f}"
        if "mae_expected" in r:
            s += f"  (expected: MAE {r['mae_expected']:.4f} RMSE {r['rmse_expected']:.4f})"
        return s + f"  n={r['n']}"
    return f"ROUGE-1 {r['rouge1']:.4f}  ROUGE-L {r['rougeL']:.4f}  n={r['n']}"


# ------------------------------------------------------------------------------------------------- driver
def run_train(cfg: TrainConfig, *, model_loader: Optional[Callable[[], Tuple[Any, Any]]] = None,
              dataset: Optional[D.Dataset] = None, progress: bool = True) -> Dict[str, Any]:
    """Run (or resume) the three stages and write OUT/metrics.json; returns the metrics dict.

    ``model_loader()`` -> (hf_model, tokenizer) replaces the SmolLM2 loader (tests pass a cached copy);
    ``dataset`` replaces loading ``cfg.data``.
    """
    import proper

    cfg = cfg.resolved()
    distributed = DD.init_from_env()
    if cfg.batch_size < DD.world_size():
        raise ValueError(f"--batch-size ({cfg.batch_size}) must be >= the number of processes ({DD.world_size()}): "
                         f"each rank trains on its slice of the global batch")
    progress = progress and DD.is_main()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    ds = dataset if dataset is not None else D.load_dataset(cfg.data)
    if ds.skipped:
        log.warning("data: skipped %s (see the problems list in metrics.json)", ds.skipped)
    if ds.meta.get("has_golds") is False:
        raise D.DataError(f"{ds.meta.get('source', cfg.data)}: no outputs (golds) file beside the LaMP questions; "
                          f"training scores the test questions, so it needs their gold outputs")
    ds = D.select_users(ds, cfg.max_users, cfg.seed)
    def loader():
        m, t = (model_loader or (lambda: load_model(cfg.num_layers)))()
        if cfg.num_layers is not None and len(m.get_decoder().layers) != cfg.num_layers:
            truncate_layers(m, cfg.num_layers)
        return m, t

    model, tok = loader()

    latest = out / "checkpoints" / "latest.json"
    resume_state = None
    if cfg.resume and latest.is_file():
        ptr = json.loads(latest.read_text())
        ck = out / "checkpoints" / ptr["dir"]
        proper.from_pretrained(model, ck)
        resume_state = torch.load(ck / "trainer_state.pt", map_location="cpu", weights_only=False)
        if _cfg(model).num_users != len(ds):
            raise ValueError(f"--resume: the checkpoint {ck} has {_cfg(model).num_users} users but this run selects "
                             f"{len(ds)}; resume with the same --data/--max-users/--seed")
        log.info("resuming from %s", ck)
    elif cfg.resume:
        log.info("--resume: no checkpoint in %s, starting fresh", out / "checkpoints")
    if resume_state is None:
        pcfg = proper.ProperConfig(num_users=len(ds), num_experts=cfg.num_experts, expert_rank=cfg.expert_rank,
                                   user_rank=cfg.user_rank, top_k=cfg.top_k, alpha=cfg.alpha,
                                   target_modules=target_modules(model, cfg.target_modules, cfg.lora_layers),
                                   backend=cfg.backend)
        proper.apply_proper(model, pcfg)
        _broadcast_adapters(model)

    tr = Trainer(cfg, ds, model, tok, progress=progress)
    if resume_state is not None and tr.progress_path.is_file():
        tr.state = json.loads(tr.progress_path.read_text())
    if DD.is_main():
        _atomic_json(out / "run_config.json", {"train": dataclasses.asdict(cfg), "proper": _cfg(model).to_dict(),
                                               "users": ds.user_list})
    done = resume_state["stage"] if resume_state is not None and resume_state["finished"] else None
    mid = resume_state if resume_state is not None and not resume_state["finished"] else None
    t0 = time.time()
    if resume_state is None:
        if ds.task == "rating":
            tr.state["systems"].update(classic_baselines(ds, tr.test_examples, tr.state.setdefault("predictions", {})))
        proper.set_stage(model, "population")
        tr.evaluate_system("base")
    stages = [s for s in STAGES if not (s == "group" and cfg.num_experts == 0)]
    first = 0
    if done is not None:
        first = stages.index(done) + 1
    elif mid is not None:
        first = stages.index(mid["stage"])
    for stage in stages[first:]:
        if cfg.steps(stage) == 0:
            proper.set_stage(model, stage)
        else:
            tr.run_stage(stage, resume=mid if (mid is not None and mid["stage"] == stage) else None)
        tr.after_stage(stage)
        tr.save_checkpoint(stage, cfg.steps(stage), True, None, {})
        mid = None
    for name in cfg.ablations:
        if name in tr.state["systems"]:
            continue
        if name == "proper_no_lora_router" and not _cfg(model).lora_router:
            continue   # the main model has no LoRA-aware router: it is this ablation already
        if name == "proper_no_lora_router" and cfg.num_experts == 0:
            continue
        run_ablation(name, tr, loader)
    metrics = {"task": ds.task, "systems": tr.state["systems"], "stages": tr.state["stages"],
               "groups": {k: {kk: vv for kk, vv in v.items() if kk != "users"} for k, v in tr.state["groups"].items()},
               "data": {"name": ds.name, **ds.counts(), "test_scored": len(tr.test_examples),
                        "dev_scored": len(tr.dev_items), "skipped": ds.skipped, "problems": ds.problems[:50],
                        "profile_buckets": _bucket_counts(ds)},
               "config": dataclasses.asdict(cfg), "proper_config": _cfg(model).to_dict(),
               "seconds_this_session": round(time.time() - t0, 1)}
    if distributed:
        from .io import proper_state_dict

        digests = DD.gather_digests(proper_state_dict(model))
        metrics["distributed"] = {"world_size": DD.world_size(), "backend": torch.distributed.get_backend(),
                                  "weights_sha256_per_rank": digests}
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel ranks finished with different weights: {digests}")
    if DD.is_main():
        _atomic_json(out / "metrics.json", metrics)
        _atomic_json(out / "history.json", tr.state["history"])
        _atomic_json(out / "group_assignments.json", tr.state["groups"])
        _atomic_json(out / "predictions.json", {
            "examples": [{"user": ex.user, "target": ex.target, "profile_size": n}
                         for ex, n in zip(tr.test_examples, tr.sizes)],
            "systems": tr.state.get("predictions", {})})
    DD.barrier()
    return metrics


def _bucket_counts(ds: D.Dataset) -> Dict[str, int]:
    c: Dict[str, int] = {}
    for s in ds.users.values():
        b = D.profile_bucket(s.profile_size)
        c[b] = c.get(b, 0) + 1
    return c


def summary_table(metrics: Dict[str, Any]) -> str:
    """The readable end-of-run summary: one line per system."""
    lines = [f"{'system':<32} metric"]
    for name, r in metrics["systems"].items():
        lines.append(f"{name:<32} {_fmt_system(r)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``proper train`` options (defaults: TrainConfig, then the --budget preset)."""
    p.add_argument("--data", default="movielens-100k",
                   help="movielens-100k (built in), a .jsonl file in our schema, or LaMP questions .json / folder")
    p.add_argument("--out", default="runs/proper", help="run directory (metrics.json, checkpoints, stages)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default",
                   help="preset sizes: default (~30 min on 2 CPU cores, a seeded random subset of users) or tiny "
                        "(a minutes-long smoke run)")
    p.add_argument("--max-users", default=None, help="N or 'all' (default: the budget's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.json")
    for name, typ in (("batch_size", int), ("steps_population", int), ("steps_group", int), ("steps_user", int),
                      ("eval_every", int), ("patience", int), ("num_experts", int), ("top_k", int),
                      ("expert_rank", int), ("user_rank", int), ("lr", float), ("user_lr", float), ("router_lr", float),
                      ("max_len", int), ("dev_max", int), ("test_max", int), ("num_layers", int),
                      ("max_history", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    p.add_argument("--lora-layers", default=None, help="adapt only the top N decoder layers ('all': every layer; "
                   "default: the budget's)")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lb-coef", type=float, default=0.01, help="load-balancing weight (group stage)")
    p.add_argument("--distinct-coef", type=float, default=0.01, help="experts-distinct weight (group stage)")
    p.add_argument("--sampling", choices=("example", "user"), default="example")
    p.add_argument("--ablations", default=",".join(ABLATIONS),
                   help=f"comma-separated trained user-stage ablations among {', '.join(ABLATIONS)} ('' for none)")
    p.add_argument("--target-modules", default="gate_proj,up_proj,down_proj", help="comma-separated")
    p.add_argument("--backend", default="auto")
    p.add_argument("--stop-after", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if isinstance(kw.get("ablations"), str):
        kw["ablations"] = tuple(s.strip() for s in kw["ablations"].split(",") if s.strip())
    if isinstance(kw.get("target_modules"), str):
        kw["target_modules"] = tuple(s.strip() for s in kw["target_modules"].split(",") if s.strip())
    ll = kw.get("lora_layers")
    if isinstance(ll, str):
        if ll.lower() == "all":
            kw["lora_layers"] = "all"
        else:
            try:
                kw["lora_layers"] = int(ll)
            except ValueError:
                raise SystemExit(f"proper train: --lora-layers must be an integer or 'all', got {ll!r}") from None
    mu = kw.get("max_users")
    if isinstance(mu, str) and mu.lower() != "all":
        try:
            kw["max_users"] = int(mu)
        except ValueError:
            raise SystemExit(f"proper train: --max-users must be a positive integer or 'all', got {mu!r}") from None
    return TrainConfig(**kw)


def run_train_args(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = config_from_args(args).resolved()
    except ValueError as e:
        print(f"proper train: {e}", file=sys.stderr)
        return 2
    if DD.init_from_env() and not DD.is_main():
        logging.getLogger("proper").setLevel(logging.WARNING)   # one rank reports
    main = DD.is_main()
    try:
        metrics = run_train(cfg, progress=not getattr(args, "no_progress", False))
    except (D.DataError, D.MissingDataError, FileNotFoundError) as e:
        print(f"proper train: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"proper train: {e}; continue with --resume", file=sys.stderr)
        return 3
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if main:
        print(summary_table(metrics))
        print(f"metrics: {Path(cfg.out) / 'metrics.json'}")
    return 0


def main_train(argv: Optional[Sequence[str]] = None) -> int:
    p = add_train_arguments(argparse.ArgumentParser(prog="proper train", description=__doc__.split("\n")[0]))
    return run_train_args(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main_train())
