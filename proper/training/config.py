"""``proper train``'s configuration: the budget presets and TrainConfig."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..config import ROUTER_SCOPES
from ..state import STAGES

ABLATIONS = ("population+user", "proper_no_lora_router")
#: The stages whose shared weights TrainConfig.ema_decay averages.
EMA_STAGES = ("population", "group")
#: TrainConfig.group_init values (training/group_init.py).
GROUP_INITS = ("ratings", "random")
#: With resident_users="auto", runs with more users than this page them (the user store, proper/store/).
PAGE_ABOVE = 128

# ------------------------------------------------------------------------------------------------ config
#: Presets. "default" is sized for ~30 minutes on a quiet 2-core CPU with SmolLM2-135M (30 layers, fp32): a
#: seeded random subset of 64 users (data.select_users: uniform, so the profile-size distribution is kept;
#: 128 test ratings), LoRAs on the FFN projections of the top 10 layers (lora_layers: backward then stops
#: there), 400/150/200 steps of 8 examples for the three stages plus 200 for each trained ablation. Measured
#: per step on that machine: ~1.1 s (population), ~1 s (user); the user LoRAs train at lr/3 (at lr they
#: overfit within ~20 steps in a first 32-user run: dev loss rose while the training probe loss rose too).
#: The default run (issue 15's protocol): 128 users (about 1,350 test ratings with the 10% split, so an MAE
#: difference has a standard error of about 0.016), dev evaluations every 100 steps on 256 dev ratings, the
#: population+user (OPPU-style) ablation only, per-user selection on up to 6 dev ratings a user, and no
#: diagnostic systems (LoRA-aware router off at inference, cold start): each test pass costs ~2 minutes.
#: "tiny" is a minutes-long smoke run (4 users, 6 steps a stage and per ablation, LoRAs on the top 2 layers).
BUDGETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(max_users=4, batch_size=4, steps_population=6, steps_group=6, steps_user=6, eval_every=3,
                 patience=3, num_experts=2, top_k=0, expert_rank=4, user_rank=2, dev_max=4, test_max=None,
                 max_len=128, lr=2e-3, user_lr=None, router_lr=2e-2, lora_layers=2, select_per_user=2,
                 diagnostics=True, ablations=ABLATIONS, ema_decay=0.0, group_init="ratings", select_by="loss"),
    "default": dict(max_users=128, batch_size=8, steps_population=400, steps_group=200, steps_user=200,
                    eval_every=100, patience=3, num_experts=4, top_k=2, expert_rank=8, user_rank=4, dev_max=256,
                    test_max=None, max_len=128, lr=1e-3, user_lr=3e-4, router_lr=1e-2, lora_layers=10,
                    select_per_user=6, diagnostics=False, ablations=("population+user",), ema_decay=0.99,
                    group_lr=3e-4, group_init="ratings", select_by="mae"),
}
#: "full": the default method on every MovieLens user (943, paged by the user store above PAGE_ABOVE), about
#: 10,400 test ratings, twice the group steps and three times the user steps (a user's LoRA still sees only a
#: handful of its examples: 600 steps of 8 spread over 943 users), dev evaluations every 200 steps on 512 dev
#: ratings. Measured: 73 min on the 2-core CPU (RESULTS.md, "The full budget").
BUDGETS["full"] = dict(BUDGETS["default"], max_users="all", steps_group=400, steps_user=600, eval_every=200,
                       dev_max=512)


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
    group_lr: Optional[float] = None   # the experts' learning rate in the group stage (None: lr)
    router_lr: Optional[float] = None  # routers' learning rate
    # Polyak averaging of the shared weights in the population and group stages (EMA_STAGES): dev evaluations,
    # early stopping and the stage's result use the average (0: off). A best-of-evaluations snapshot of noisy raw
    # weights overfits the dev set; the average is smoother. Not in the user stage: a user's rows move only on
    # the steps that hold the user, so one decay per step would mean a different average per user.
    ema_decay: Optional[float] = None  # (None: the budget's)
    # early stopping of each stage (and the weights it keeps): "loss" (dev NLL) or "mae" (rating tasks: the dev
    # MAE of the median rule, the dev loss breaking ties; the metric reported, where the loss can prefer a model
    # that predicts every user's ratings worse; else the loss)
    select_by: Optional[str] = None    # (None: the budget's)
    # the group assignments at the group stage's start: "ratings" (users clustered by their training ratings,
    # training/group_init.py) or "random" (the router's seeded random rows)
    group_init: Optional[str] = None   # (None: the budget's)
    lb_coef: float = 0.01              # load-balancing term of the group loss
    distinct_coef: float = 0.01        # experts-distinct term of the group loss
    max_len: Optional[int] = None      # prompt + target tokens; longer prompts lose their start
    dev_max: Optional[int] = None      # dev examples scored per evaluation (None: all)
    test_max: Optional[int] = None     # test examples scored per system (None: all)
    max_history: Optional[int] = None  # train on each user's latest N history examples only (None: all)
    eval_batch_size: int = 16
    sampling: str = "example"          # "example": uniform over training examples; "user": user, then example
    grad_clip: float = 1.0
    lr_schedule: str = "constant"      # within each stage: "constant" or "cosine" (to 10% at the stage's end)
    # linear learning-rate warmup over each stage's first N steps: every stage starts a fresh AdamW, whose first
    # updates move every parameter by about lr whatever its gradient's size (m / sqrt(v) = +-1 at step 1)
    warmup_steps: int = 0
    backend: str = "auto"
    # scoring passes (dev, test, per-user selection) run only the adapted top layers, the unadapted bottom's
    # hidden states cached per sequence (training/prefix.py); False: every pass runs every layer
    prefix_cache: bool = True
    resume: bool = False
    num_layers: Optional[int] = None   # keep only the first N decoder layers (tests and smoke runs)
    stop_after: Optional[str] = None   # "STAGE:STEP": stop there as if interrupted (tests of --resume)
    max_new_tokens: int = 32           # generation data: tokens generated per test example
    ablations: Optional[Tuple[str, ...]] = None   # trained user-stage ablations (ABLATIONS; None: the budget's)
    # per-user early stopping of the user stage: "dev" keeps a user's LoRA only where it lowered that user's
    # dev loss (else its B is reset to zero: the user is served by the groups), "none" keeps every LoRA
    user_select: str = "dev"
    router_scope: str = "model"        # ProperConfig.router_scope
    token_router: bool = False         # ProperConfig.token_router (per-token gate term; off = the paper's routing)
    select_per_user: Optional[int] = None   # dev ratings per user scored for that selection (None: budget's)
    diagnostics: Optional[bool] = None      # also score the LoRA-router-off and cold-start systems
    on_error: str = "raise"            # bad data lines/users: "raise" (name file and line) or "skip" (count them)
    resident_users: Any = "auto"       # user slots (the paged user store): "auto" (PAGE_ABOVE), "all" or an int
    user_store: Optional[str] = None   # the store's folder when paged (None: OUT/user_store)

    def paging(self, num_users: int) -> Tuple[Optional[int], Optional[str]]:
        """(resident_users, user_store) of the run's ProperConfig for ``num_users`` users: "auto" pages above
        PAGE_ABOVE users, with slots for two training batches and an evaluation batch."""
        r = self.resident_users
        if r == "auto":
            r = None if num_users <= PAGE_ABOVE else max(2 * self.batch_size, self.eval_batch_size, 32)
        elif r in (None, "all"):
            r = None
        r = None if r is None else min(int(r), num_users)
        if r is None:
            return None, None
        return r, self.user_store or str(Path(self.out) / "user_store")

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
        for name in ("steps_population", "steps_group", "steps_user", "num_experts", "top_k", "warmup_steps"):
            if int(getattr(cfg, name)) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
        cfg.ablations = tuple(cfg.ablations)
        if cfg.router_scope not in ROUTER_SCOPES:
            raise ValueError(f"--router-scope must be one of {ROUTER_SCOPES}, got {cfg.router_scope!r}")
        if not 0.0 <= float(cfg.ema_decay) < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1) (0: off), got {cfg.ema_decay!r}")
        if cfg.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
        if cfg.user_select not in ("dev", "none"):
            raise ValueError(f"--user-select must be 'dev' or 'none', got {cfg.user_select!r}")
        if int(cfg.select_per_user) < 1:
            raise ValueError(f"--select-per-user must be >= 1, got {cfg.select_per_user}")
        bad = [a for a in cfg.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"--ablations: unknown {bad}; known: {ABLATIONS}")
        r = cfg.resident_users
        if not (r in ("auto", "all", None) or (isinstance(r, int) and not isinstance(r, bool) and r >= 1)):
            raise ValueError(f"--resident-users must be 'auto', 'all' or an int >= 1, got {r!r}")
        if cfg.on_error not in ("raise", "skip"):
            raise ValueError(f"--on-error must be 'raise' or 'skip', got {cfg.on_error!r}")
        if cfg.select_by not in ("loss", "mae"):
            raise ValueError(f"--select-by must be 'loss' or 'mae', got {cfg.select_by!r}")
        if cfg.group_init not in GROUP_INITS:
            raise ValueError(f"--group-init must be one of {GROUP_INITS}, got {cfg.group_init!r}")
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

