"""The Trainer: runs one stage at a time on a patched model (batches, steps, dev evaluation, early stopping,
checkpoints) and evaluates the systems each stage makes."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data as D
from . import distributed as DD

from ..generation import generate_for_users
from ..io import save_pretrained
from ..optim import make_optimizer
from ..patch import set_stage
from ..routing import lora_router_disabled, refresh_cold_start, reset_user_adapters
from ..state import get_state
from .batches import collate, encode, step_seed
from .checkpoints import save_checkpoint, write_json
from .config import EMA_STAGES, TrainConfig, TrainingInterrupted
from .evaluation import (fmt_system, group_report, mean_lm_loss, median_rating, rating_metrics, rouge_metrics,
                         score_next_token, spread, user_gates)
from .group_init import init_groups_from_ratings
from .losses import distinct_loss, load_balance_loss, lm_loss
from .prefix import FrozenPrefix

log = logging.getLogger("proper.train")


class Trainer:
    """Runs the three stages on one patched model; see the module docstring for what it writes."""

    def __init__(self, cfg: TrainConfig, dataset: D.Dataset, model, tokenizer, *, progress: bool = True,
                 share_prefix: Optional[FrozenPrefix] = None):
        self.cfg, self.ds, self.model, self.tok = cfg, dataset, model, tokenizer
        # scoring passes run only the adapted top layers, the frozen bottom's states cached (training/prefix.py);
        # share_prefix: the main run's cache, for an ablation's copy of the same base model
        self.prefix = FrozenPrefix.for_model(model, share=share_prefix) if cfg.prefix_cache else None
        self.out = Path(cfg.out)
        self.progress = progress
        slots = get_state(model).slots
        # a paged model: an evaluation batch's users must fit the slots, and so must a training batch's
        self.eval_bs = cfg.eval_batch_size if slots is None else max(1, min(cfg.eval_batch_size, slots.num_slots))
        if slots is not None and cfg.batch_size > slots.num_slots:
            raise ValueError(f"--resident-users ({slots.num_slots}) must be >= --batch-size ({cfg.batch_size}): a "
                             f"training step's users are resident together")
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
        dev = spread(dataset.examples("dev"), cfg.dev_max)
        self.dev_items = enc(dev)
        # per-user early stopping scores every user on up to select_per_user of its own dev examples
        self.select_items = enc([ex for s in dataset.users.values() for ex in spread(s.dev, cfg.select_per_user)])
        self.test_examples = spread(dataset.examples("test"), cfg.test_max)
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
        rng = np.random.default_rng(step_seed(self.cfg.seed, stage, step))
        bs = self.cfg.batch_size
        if self.cfg.sampling == "user":
            us = rng.integers(0, len(self.by_user), bs)
            idx = [self.by_user[u][rng.integers(0, len(self.by_user[u]))] for u in us]
        else:
            idx = rng.integers(0, len(self.train_items), bs).tolist()
        # the global batch is the same on every rank; each rank trains on its slice (proper.distributed)
        slots = get_state(self.model).slots
        if slots is not None and DD.world_size() > 1:   # slot s holds the same user on every rank: the slot
            slots.arrange([self.train_items[i].row for i in idx])   # tables' gradients average slot by slot
        return collate([self.train_items[i] for i in DD.shard(idx)], self.pad)

    # ------------------------------------------------------------------------------ evaluation
    def dev_loss(self) -> Dict[str, float]:
        if self.rating:
            s = score_next_token(self.model, self.dev_items, self.pad, self.eval_bs, self.rating_ids, self.prefix)
            pred = s["probs"].argmax(-1) + 1
            true = np.array([self.rating_ids.index(it.ids[it.n_prompt]) + 1 for it in self.dev_items])
            return {"dev_loss": float(s["nll"].mean()), "dev_mae": float(np.abs(pred - true).mean()),
                    "dev_mae_median": float(np.abs(median_rating(s["probs"]) - true).mean())}
        return {"dev_loss": mean_lm_loss(self.model, self.dev_items, self.pad, self.eval_bs, self.prefix)}

    def _score(self, d: Dict[str, float]) -> List[float]:
        """The early-stopping criterion of a dev evaluation ``d``, compared lexicographically (_improves): the dev
        loss, or with select_by="mae" on a rating task (dev_mae_median, dev_loss), so that MAE decides and the loss
        breaks its ties (MAE over a few hundred integer ratings moves in steps of 1/n and often stays put)."""
        if self.cfg.select_by == "mae" and "dev_mae_median" in d:
            return [d["dev_mae_median"], d["dev_loss"]]
        return [d["dev_loss"]]

    def user_dev_losses(self, items: Optional[List] = None) -> np.ndarray:
        """[U] each user's mean dev loss (the next-token NLL of a rating, the target tokens' LM loss otherwise)
        over its selection examples (``items``: a subset of them); NaN for a user with none."""
        items = self.select_items if items is None else items
        if self.rating:
            nll = score_next_token(self.model, items, self.pad, self.eval_bs, prefix=self.prefix)["nll"]
        else:
            nll = np.array([mean_lm_loss(self.model, [it], self.pad, 1, self.prefix) for it in items])
        rows = np.array([it.row for it in items], dtype=np.int64)
        sums = np.bincount(rows, weights=nll, minlength=len(self.ds))
        cnt = np.bincount(rows, minlength=len(self.ds))
        out = np.full(len(self.ds), np.nan)
        out[cnt > 0] = sums[cnt > 0] / cnt[cnt > 0]
        return out

    def select_users(self, before: np.ndarray) -> Dict[str, Any]:
        """Per-user early stopping at the end of the user stage: every user whose dev loss did not fall below
        ``before`` (its loss when the stage started: its LoRA's B at zero) gets its B reset to zero, so the
        groups (or the population LoRA) serve it. A few dozen ratings cannot support a user LoRA for every user;
        this keeps it only where the user's own held-out ratings say it helps. Users without dev examples keep
        theirs."""
        after = self.user_dev_losses()
        reset = [u for u in range(len(self.ds)) if np.isfinite(after[u]) and not after[u] < before[u]]
        reset_user_adapters(self.model, reset)
        final = after.copy()
        if reset:
            chosen = set(reset)
            final[reset] = self.user_dev_losses([it for it in self.select_items if it.row in chosen])[reset]
        ok = np.isfinite(before) & np.isfinite(after)
        res = {"users_kept": int(ok.sum()) - len(reset), "users_reset": len(reset),
               "dev_loss_start": float(np.nanmean(before)), "dev_loss_end": float(np.nanmean(after)),
               "dev_loss_selected": float(np.nanmean(final)), "reset": [self.ds.user_list[u] for u in reset]}
        log.info("user selection: kept %d user LoRAs, reset %d; mean per-user dev loss %.4f (start) -> %.4f (end) "
                 "-> %.4f (selected)", res["users_kept"], res["users_reset"], res["dev_loss_start"],
                 res["dev_loss_end"], res["dev_loss_selected"])
        return res

    def evaluate_system(self, name: str, cold: bool = False) -> Dict[str, Any]:
        items = self.test_cold if cold else self.test_items
        t0 = time.time()
        if self.rating:
            s = score_next_token(self.model, items, self.pad, self.eval_bs, self.rating_ids, self.prefix)
            probs = s["probs"]
            y = [float(ex.target) for ex in self.test_examples]
            pred, expected, median = probs.argmax(-1) + 1, probs @ np.arange(1, 6), median_rating(probs)
            res = rating_metrics(y, pred, self.sizes, expected, median)
            res["nll"] = float(s["nll"].mean())
            self.state.setdefault("predictions", {})[name] = {"pred": pred.tolist(),
                                                              "expected": [round(float(v), 5) for v in expected],
                                                              "median": median.tolist()}
        else:
            pairs = DD.shard([(it.row, ex.input) for it, ex in zip(items, self.test_examples)])
            preds = generate_for_users(self.model, self.tok, pairs, max_new_tokens=self.cfg.max_new_tokens,
                                       batch_size=self.eval_bs) if pairs else []
            preds = DD.gather_sharded(preds)
            res = rouge_metrics([ex.target for ex in self.test_examples], [p.strip() for p in preds], self.sizes)
            self.state.setdefault("predictions", {})[name] = {"pred": [p.strip() for p in preds]}
        res["seconds"] = round(time.time() - t0, 2)
        self.state["systems"][name] = res
        log.info("%s: %s", name, fmt_system(res))
        return res

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, stage: str, step: int, finished: bool, opt, es: Dict[str, Any]) -> None:
        """A resumable checkpoint (training/checkpoints.py); the progress file is written with it."""
        save_checkpoint(self.out / "checkpoints", self.model,
                        {"stage": stage, "step": step, "finished": finished,
                         "optimizer": None if opt is None else opt.state_dict(), "early_stopping": es},
                        on_saved=self._save_progress)

    def _save_progress(self) -> None:
        if DD.is_main():
            write_json(self.progress_path, self.state)

    # ------------------------------------------------------------------------------ a stage
    def _optimizer(self, stage: str):
        """Lazy AdamW (proper.make_optimizer): a user's rows move only on steps whose batch holds that user."""
        user_lr = self.cfg.user_lr if (stage == "user" and self.cfg.user_lr) else None
        lr = self.cfg.group_lr if (stage == "group" and self.cfg.group_lr) else self.cfg.lr
        return make_optimizer(self.model, lr=lr, user_lr=user_lr, router_lr=self.cfg.router_lr,
                              weight_decay=0.0)

    def _trainable_named(self) -> Dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _best_copy(self, named: Dict[str, torch.nn.Parameter]) -> Dict[str, torch.Tensor]:
        """The early-stopping copy of the trained weights. A paged model's user slots are not copied (slots change
        users): the user store's snapshot is kept instead (in memory; a resumed run restarts it)."""
        slots = get_state(self.model).slots
        if slots is not None:
            self._best_users = slots.snapshot()
        return self._shared_copy(named)

    def _shared_copy(self, named: Dict[str, torch.nn.Parameter]) -> Dict[str, torch.Tensor]:
        """A copy of the trained weights other than the paged user slots."""
        return {k: p.detach().clone() for k, p in named.items() if k not in self._slot_tables}

    @staticmethod
    def _load_weights(named: Dict[str, torch.nn.Parameter], values: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in named.items():
                if k in values:
                    p.copy_(values[k])

    def _restore_best(self, named, best: Dict[str, torch.Tensor]) -> None:
        self._load_weights(named, best)
        slots = get_state(self.model).slots
        if slots is not None and self._best_users is not None:
            slots.restore(self._best_users)

    def _uses_ema(self, stage: str) -> bool:
        return self.cfg.ema_decay > 0 and stage in EMA_STAGES

    def _ema_update(self, named: Dict[str, torch.nn.Parameter], ema: Dict[str, torch.Tensor], step: int) -> None:
        """Polyak averaging with the usual warm-up: decay min(ema_decay, (1 + t) / (10 + t)) at step t, so early
        averages are not dominated by the initial weights."""
        d = min(self.cfg.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for k, v in ema.items():
                v.lerp_(named[k].detach(), 1.0 - d)

    @contextlib.contextmanager
    def _weights(self, named: Dict[str, torch.nn.Parameter], values: Optional[Dict[str, torch.Tensor]]):
        """The trained weights replaced by ``values`` (the averages) for the duration; None: unchanged."""
        if values is None:
            yield
            return
        raw = {k: named[k].detach().clone() for k in values}
        self._load_weights(named, values)
        try:
            yield
        finally:
            self._load_weights(named, raw)

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
        cfg = self.cfg
        set_stage(self.model, stage)
        self.model.train()
        steps = cfg.steps(stage)
        opt = self._optimizer(stage)
        base_lrs = [g["lr"] for g in opt.param_groups]   # before a resume's load_state_dict overwrites them
        named = self._trainable_named()
        routers = {id(p) for g in opt.param_groups if g["name"] in ("routers", "router_rows") for p in g["params"]}
        slots = get_state(self.model).slots
        tables = {id(t) for *_, t in slots.tables} if slots is not None else set()
        self._slot_tables = {k for k, p in named.items() if id(p) in tables}
        self._best_users = None
        hist = self.state["history"].setdefault(stage, {"steps": [], "evals": []})
        info = self.state["stages"].setdefault(stage, {})
        t_start = time.time()
        if resume is not None:
            opt.load_state_dict(resume["optimizer"])
            es = resume["early_stopping"]
            es["best"] = {k: v.clone() for k, v in es["best"].items()}
            if "ema" in es:
                es["ema"] = {k: v.clone() for k, v in es["ema"].items()}
            if slots is not None:   # the users' best copy did not survive the restart: it starts from here
                self._best_users = slots.snapshot()
            start = resume["step"] + 1
            # the history written after the checkpoint was taken is discarded, so it matches the weights
            hist["steps"] = [h for h in hist["steps"] if h["step"] < start]
            hist["evals"] = [h for h in hist["evals"] if h["step"] < start]
            log.info("%s: resuming at step %d", stage, start)
        else:
            if stage == "group" and cfg.group_init == "ratings":
                report = init_groups_from_ratings(self.model, self.ds, cfg.seed)
                info["group_init"] = report or {"how": "random", "why": "not a rating task, K < 2 or U < K"}
                if report:
                    log.info("group: assignments start at rating clusters of sizes %s (mean ratings %s)",
                             report["cluster_sizes"], report["cluster_mean_rating"])
            info.update(probe_loss_start=mean_lm_loss(self.model, self.probe_items, self.pad, self.eval_bs,
                                                      self.prefix))
            d0 = self.dev_loss()
            hist["evals"].append({"step": -1, **d0})
            # The population stage's start is the base model without adapters: recorded, but never kept. With 943
            # users its median-rule dev MAE (1.000) beat the trained population model's (1.018, a difference
            # well inside 512 ratings' noise) while its dev loss was 2.95 against 1.55, and the MAE rule rolled
            # 400 steps back to the base model. Later stages start from a trained model and may roll back to it.
            score0 = [math.inf] * len(self._score(d0)) if stage == "population" else self._score(d0)
            es = {"best_loss": d0["dev_loss"], "best_score": score0, "best_step": -1, "bad": 0,
                  "stopped": False, "best": self._best_copy(named)}
            if self._uses_ema(stage):
                es["ema"] = self._shared_copy(named)
            if stage == "user" and cfg.user_select == "dev":
                es["select_before"] = self.user_dev_losses().tolist()
            start = 0
        stop_stage, stop_step = (cfg.stop_after.split(":") + [None])[:2] if cfg.stop_after else (None, None)
        bar = tqdm(total=steps, mininterval=1.0, initial=start, desc=stage, disable=not self.progress)
        last = start - 1   # the last step run
        try:
            for step in range(start, steps):
                if es["stopped"]:
                    break
                last = step
                torch.manual_seed(step_seed(cfg.seed, stage, step))
                loss, parts = self.stage_loss(stage, self.batch(stage, step))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                DD.average_gradients(list(named.values()))
                if DD.world_size() > 1:   # log the mean over the ranks' slices
                    parts = dict(zip(parts, (v / DD.world_size() for v in DD.all_reduce_sum(parts.values()))))
                gn = torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.grad_clip)
                if stage != "population":
                    parts["router_grad_norm"] = _grad_norm([p for p in named.values() if id(p) in routers])
                parts["grad_norm"] = float(gn)
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * lr_factor(cfg.lr_schedule, step, steps, cfg.warmup_steps)
                opt.step(touched=DD.union_rows(opt.touched_rows()))   # every rank moves the same users
                if "ema" in es:
                    self._ema_update(named, es["ema"], step)
                hist["steps"].append({"step": step, **parts})
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.4f}")
                if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
                    with self._weights(named, es.get("ema")):   # with EMA: the averages are evaluated and kept
                        d = self.dev_loss()
                        score = self._score(d)
                        best = _improves(score, es.get("best_score", [es["best_loss"]]))
                        if best:
                            es.update(best_loss=d["dev_loss"], best_score=score, best_step=step, bad=0,
                                      best=self._best_copy(named))
                    hist["evals"].append({"step": step, **d})
                    if not best:
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
        info["probe_loss_end"] = mean_lm_loss(self.model, self.probe_items, self.pad, self.eval_bs, self.prefix)
        if es["best_step"] == last and "ema" not in es:
            info["probe_loss_best"] = info["probe_loss_end"]
        else:
            self._restore_best(named, es["best"])   # the best dev weights
            info["probe_loss_best"] = mean_lm_loss(self.model, self.probe_items, self.pad, self.eval_bs, self.prefix)
        if "select_before" in es:
            info["selection"] = self.select_users(np.asarray(es["select_before"], dtype=np.float64))
        if info["probe_loss_end"] >= info["probe_loss_start"]:
            log.warning("%s: the training probe loss did not fall (%.4f -> %.4f)", stage, info["probe_loss_start"],
                        info["probe_loss_end"])

    def after_stage(self, stage: str) -> None:
        """Evaluate the systems this stage makes and log group assignments; save the stage's model."""
        rows = torch.arange(len(self.ds))
        if stage == "population":
            self.evaluate_system("population")
        elif stage == "group":
            refresh_cold_start(self.model)   # a paged model's cold-start gates, over the users it now stores
            self.evaluate_system("group")
            g = user_gates(self.model, rows, "group")
            if g is not None:
                self.state["groups"]["group"] = group_report(g, self.ds.user_list)
        else:
            self.evaluate_system("proper")
            if self.cfg.diagnostics:
                if get_state(self.model).cfg.lora_router:
                    with lora_router_disabled(self.model):
                        self.evaluate_system("proper_router_off_at_inference")
                self.evaluate_system("proper_cold_start", cold=True)
            g = user_gates(self.model, rows, "user")
            if g is not None:
                self.state["groups"]["user"] = group_report(g, self.ds.user_list)
        if DD.is_main():
            save_pretrained(self.model, self.out / "stages" / stage)



def _improves(score: List[float], best: List[float]) -> bool:
    """Whether a dev score (Trainer._score) beats the best so far: its first entry lower by more than 1e-4 of a
    loss / 1e-9 of an MAE, or equal there and the next entry lower by more than 1e-4."""
    if len(score) != len(best):   # a checkpoint from a run with another criterion: compare the dev loss
        score, best = score[-1:], best[-1:]
    if len(score) == 1:
        return score[0] < best[0] - 1e-4
    if score[0] < best[0] - 1e-9:
        return True
    return abs(score[0] - best[0]) <= 1e-9 and score[1] < best[1] - 1e-4


#: The cosine schedule ends at this fraction of the stage's learning rate.
COSINE_FLOOR = 0.1


def lr_factor(schedule: str, step: int, steps: int, warmup: int = 0) -> float:
    """The learning-rate multiplier of ``step`` (0-based) in a stage of ``steps``: 1 ("constant"), or a cosine
    from 1 down to COSINE_FLOOR at the last step ("cosine": the last evaluations of a stage see less step noise,
    so early stopping compares settled weights), times a linear warmup (step + 1) / warmup over the first
    ``warmup`` steps. A function of the step only, so a resumed stage matches."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant" or steps <= 1:
        return ramp
    return ramp * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1))))


def _grad_norm(params) -> float:
    gs = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(gs).norm()) if gs else 0.0
