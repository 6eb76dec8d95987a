"""proper.training: the three-stage PROPER trainer behind ``proper train``: population -> group -> user, all
in mixed-user batches.

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

Routers: by default (``--router-scope model``, ProperConfig.router_scope) ONE user-aware router for the whole
model: one user embedding table and one head, so each user has one group assignment shared by every adapted
layer (the paper's "a user's group"); ``heads`` keeps that embedding with a head per layer, ``layer`` gives every
layer its own router (the form before). The LoRA-aware router is per layer (it reads that layer's user LoRA).
``--token-router`` (off by default) adds a per-token term W_l x_t to each layer's gate logits (zero at the start,
trained with the router in the group stage); L_lb still uses the per-user gates.
A user's "group assignment" is reported as its gates averaged over the layers (identical layers with the
model-level router; top group = argmax, entropy of that average), next to the mean of the per-layer
entropies. L_lb then has one term (the model-level router's). The LoRA-aware router's head starts at zero and
reads the user LoRAs, whose B starts at zero: its gradient is exactly zero at the first user-stage step and
non-zero from the second on.

Per-user early stopping (``--user-select dev``, the default): a user's LoRA sees a few dozen examples, and one
dev loss over all users cannot say for which users it helps. At the start of the user stage every user's dev
loss is measured on up to ``select_per_user`` of its own dev examples (the group model: B = 0), and again at
the end (after the stage's best dev weights are restored); a user whose dev loss did not fall gets its B reset
to zero (``proper.reset_user_adapters``), so the groups serve it. The same rule applies to the population+user
ablation (there the population LoRA serves a reset user). Chosen on dev data only; what it kept and reset is in
metrics.json -> stages -> user -> selection.

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

Systems (rating data): user_mean (the user's mean training rating), user_median (its median: the constant that
minimises a user's absolute error), item_mean (the item's mean training
rating over the selected users, the global mean for unseen items), mf_svd (biased matrix factorisation,
scikit-surprise's SVD with its default hyper-parameters, fitted on the same training ratings), base (the
untouched model), population, group, proper, and the trained ablations of the user stage, each a second copy of
the model that starts from this run's frozen parts and trains the user LoRAs on the same batches:
population+user (no groups: the population LoRA, then each user's own LoRA added with w = 1: the OPPU-style
baseline, Tan et al. 2024 -- a user's LoRA gets gradients only from that user's examples and its Adam rows move
only on steps holding that user, so each is trained on that user's history alone, in mixed batches) and
proper_no_lora_router (the experts and user-aware router, user LoRAs added with w = 1, no LoRA-aware router;
in the tiny budget, or with ``--ablations``). With ``--diagnostics`` (on in the tiny budget): proper_cold_start
(every test user treated as unknown) and proper_router_off_at_inference (the trained PROPER model with its
LoRA-aware router switched off at inference only). LLM systems predict the argmax over the five rating
tokens ("mae", "rmse": the LaMP protocol), the expectation under their renormalised probabilities
("mae_expected", "rmse_expected") and their median ("mae_median", "rmse_median": the Bayes decision for absolute
error, which MAE scores; ``proper eval --decision median`` builds the multi-seed report on it, against the same
classic rows, user_median among them). Dev evaluations record "dev_mae" and "dev_mae_median" beside the loss.
Metrics come from scikit-learn (MAE/RMSE) and rouge-score (ROUGE-1/L, generation data).

Learning rates: ``lr`` for the population LoRA (and the experts, unless ``group_lr`` sets theirs), ``router_lr``
for the routers, ``user_lr`` for the user LoRAs.

Group start (``group_init``, "ratings" in both budgets): the experts start as copies of the population LoRA, so
with random router rows every expert computes the same thing, the router's gradient is zero and the experts drift
apart only through the random gate mix; "ratings" starts each user's gates at a k-means cluster of the users'
shrunk rating histograms (group_init.py, through ``proper.set_router_logits``), so each expert starts training
on users who rate alike. "random" keeps the router's seeded random rows (and is what a generation task gets).

Early stopping (``select_by``): "loss" compares dev losses; "mae" (the default budget; rating tasks) compares the
dev MAE of the median rule and lets the dev loss break its ties. On MovieLens dev the loss preferred a population
model that predicts the same rating for everyone over a group model with 0.15 lower MAE. A stage whose evaluations
never beat its start rolls back to it, except the population stage, whose start (the base model without adapters)
is recorded but never kept.

Weight averaging (``ema_decay``: 0.99 in the default budget, off in tiny): in the population and group stages,
an exponential moving average of the shared weights (decay min(ema_decay, (1 + t) / (10 + t)) at step t) is
what the dev evaluations score, what early stopping keeps and what the stage hands on; the raw weights keep
training. Why: with small batches the raw weights' dev loss swings between evaluations, so the best-of-evaluations
snapshot is a lucky draw that the next stage regresses from. Not in the user stage (a user's rows move only on
the steps that hold it).

Scoring passes (dev, test, per-user selection) run through a frozen-prefix cache (``prefix_cache``, on by
default; prefix.py): the decoder layers below the lowest adapted one are frozen and adapter-free, so each
sequence's hidden state there is computed once and the later passes run only the adapted top layers (10 of 30
by default: a test pass costs about a third). Training steps always run every layer.

Modules: config (TrainConfig, presets), model_setup (the base model), batches, losses, evaluation, prefix (the
scoring passes' frozen-prefix cache), group_init (the rating-cluster start of the groups), checkpoints (the one
write and resume path), trainer, ablations, run (run_train), report (tables, plots, bootstrap intervals),
distributed (torchrun data parallelism).
"""
from .batches import Encoded, collate, encode
from .config import ABLATIONS, BUDGETS, STAGES, TrainConfig, TrainingInterrupted
from .evaluation import classic_baselines, group_report, rating_metrics, rouge_metrics, summary_table
from .losses import distinct_loss, expert_cosines, lm_loss, load_balance_loss
from .model_setup import load_model, target_modules, truncate_layers
from .run import run_train
from .trainer import Trainer

__all__ = ["TrainConfig", "BUDGETS", "STAGES", "ABLATIONS", "TrainingInterrupted", "Trainer", "run_train",
           "summary_table", "load_model", "truncate_layers", "target_modules", "Encoded", "encode", "collate",
           "lm_loss", "load_balance_loss", "distinct_loss", "expert_cosines", "rating_metrics", "rouge_metrics",
           "classic_baselines", "group_report"]
