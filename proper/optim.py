"""Row-sparse (lazy) AdamW: a user's rows move only on steps whose batch contains that user.

``torch.optim.AdamW`` over the per-user tables keeps moving every row with non-zero moments, zero gradient or
not: a user's adapter drifts through momentum for many steps after that user's last batch, steps spent on other
users. :class:`ProperAdamW` updates the per-user tensors (``user_a``, ``user_b`` and the user-aware router's
``embedding.weight``: rows indexed by user) only in the rows of the users the step saw, which the model's
ProperState records from every forward run with gradients since the last step (ids -1 touch nothing; gradient
accumulation over several forwards gives the union). Every other trainable tensor (population, experts, router
heads) gets plain AdamW through torch's own functional ``adamw``.

Lazy-Adam semantics of a row-sparse tensor P, for the set R of touched rows (``t`` counts steps per row, so a
user's bias correction counts that user's own steps):

    for r in R:   t_r += 1
                  P_r *= 1 - lr * weight_decay
                  m_r = b1 m_r + (1 - b1) g_r,     v_r = b2 v_r + (1 - b2) g_r^2
                  P_r -= lr / (1 - b1^t_r) * m_r / (sqrt(v_r / (1 - b2^t_r)) + eps)
    r not in R:   P_r, m_r, v_r, t_r stay bit-identical, whatever their gradient holds

When every row is touched on every step this is exactly AdamW. A gradient outside R is ignored: e.g. the
cold-start average over every router embedding (ids -1) gives all rows one; the contract is that only a user's
own data moves that user. A touched row counts as touched even when its gradient is all zeros (its t advances
and its moments decay): being in the batch is what counts, so the row set never depends on gradient values or
their underflow, and needs no scan of the gradients.

Paged models (``ProperConfig(resident_users=S)``): the row-sparse tensors are the S user slots; the optimizer's
moment rows and step counts are paged with the users (proper/store/slots.py), so a user's moments follow it
through evictions, and a step releases the slots that forwards with gradients held for it. ``state_dict()``
then leaves the row-sparse tensors' state out (it lives in the user store, which ``save_pretrained`` writes)
and records the optimizer's epoch instead.

Under data parallelism each rank sees its own users: pass the union over the ranks as ``step(touched=...)``
(the trainer does, with ``proper.training.distributed.union_rows``), or the ranks diverge. The optimizer itself
never calls torch.distributed (the model layer knows no process groups).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as _adamw

from .modules.linear import ProperLinear
from .state import ProperState, get_state

#: Local keys of a ProperLinear's tensors whose rows are users (dim 0 = num_users).
USER_ROW_KEYS = ("user_a", "user_b", "router.embedding.weight")

_GROUP_NAMES = ("shared", "routers", "users", "router_rows")


class ProperAdamW(torch.optim.Optimizer):
    """AdamW whose ``row_sparse`` param groups update only the touched rows (module docstring).

    ``params``: parameters or param-group dicts, as for torch.optim.AdamW; a group with ``row_sparse=True``
    holds tensors whose dim 0 is the user. ``model``: the patched model whose recorded users a step uses when
    ``step(touched=)`` is not given. Build it with :func:`make_optimizer` rather than by hand.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, amsgrad: bool = False, maximize: bool = False, foreach: Optional[bool] = None,
                 model: Optional[nn.Module] = None):
        _check_hyper("lr", lr)
        _check_hyper("eps", eps)
        _check_hyper("weight_decay", weight_decay)
        _check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, row_sparse=False, name="")
        super().__init__(params, defaults)
        for g in self.param_groups:
            _check_hyper("lr", g["lr"])
            _check_betas(g["betas"])
            if g["row_sparse"] and any(p.dim() < 1 for p in g["params"]):
                raise ValueError("ProperAdamW: a row_sparse group holds a 0-d tensor; its tensors must have a user "
                                 "dimension (dim 0)")
        self._proper_state: Optional[ProperState] = None if model is None else get_state(model)
        slots = self._slots()
        if slots is not None:
            slots.attach_optimizer(self)

    def _slots(self):
        return None if self._proper_state is None else self._proper_state.slots

    def create_row_state(self) -> None:
        """Create the state of every row-sparse tensor now (zeros), rather than at its first step."""
        for g in self.param_groups:
            if g["row_sparse"]:
                for p in g["params"]:
                    self._new_state(p, g, lambda: torch.zeros(p.shape[0], dtype=torch.float32, device=p.device))

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for g in self.param_groups:
            for k, v in (("amsgrad", False), ("maximize", False), ("foreach", None), ("row_sparse", False),
                         ("name", "")):
                g.setdefault(k, v)

    # ------------------------------------------------------------------------------------------ rows
    def touched_rows(self) -> Tensor:
        """The users this optimizer's model recorded since the last step: sorted unique int64 [n] (one sync)."""
        if self._proper_state is None:
            raise ValueError("ProperAdamW: no model to read the step's users from; build the optimizer with "
                             "proper.make_optimizer(model) or pass step(touched=user_rows)")
        return self._proper_state.touched_rows()

    def _rows(self, touched, num_rows: int) -> Tensor:
        rows = self.touched_rows() if touched is None else touched
        if not isinstance(rows, Tensor):
            try:
                rows = torch.as_tensor(rows, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"ProperAdamW.step: argument 'touched' must be a 1-D integer tensor or a sequence "
                                f"of user rows, got {type(touched).__name__} ({e})") from None
        if rows.dim() != 1 or rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise TypeError(f"ProperAdamW.step: argument 'touched' must be a 1-D integer tensor of user rows, got "
                            f"shape {tuple(rows.shape)} dtype {rows.dtype}")
        rows = rows.to(torch.int64).unique()
        rows = rows[rows >= 0]                      # -1 (no user) touches nothing
        if rows.numel() and int(rows[-1]) >= num_rows:
            raise ValueError(f"ProperAdamW.step: argument 'touched' must hold user rows in [-1, {num_rows}), got "
                             f"{int(rows[-1])}")
        return rows

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None, *, touched: Union[Tensor, Sequence[int], None] = None):
        """One AdamW step; row-sparse groups move only the rows ``touched`` (default: the users the model's
        forwards with gradients saw since the last step). Clears the model's record."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = [p for g in self.param_groups if g["row_sparse"] for p in g["params"] if p.grad is not None]
        rows: Dict[torch.device, Tensor] = {}
        stepped: List[int] = []
        if sparse:
            r = self._rows(touched, min(p.shape[0] for p in sparse))
            rows = {p.device: r.to(p.device) for p in sparse}
            stepped = r.tolist()
        for g in self.param_groups:
            if g["row_sparse"]:
                self._sparse_step(g, rows)
            else:
                self._dense_step(g)
        slots = self._slots()
        if slots is not None:   # the stepped slots changed; every slot held for this step is free again
            slots.mark_dirty(stepped)
            slots.release_held()
        if self._proper_state is not None:
            self._proper_state.clear_touched()
        return loss

    def _state_of(self, p: Tensor, g: Dict[str, Any], step) -> Dict[str, Tensor]:
        """p's optimizer state, created on its first step (``step()``: a zero count, or one per row)."""
        if p.grad.is_sparse:
            raise RuntimeError("ProperAdamW does not support sparse gradients")
        return self._new_state(p, g, step)

    def _new_state(self, p: Tensor, g: Dict[str, Any], step) -> Dict[str, Tensor]:
        st = self.state[p]
        if not st:
            st["step"] = step()
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if g["amsgrad"]:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _dense_step(self, g: Dict[str, Any]) -> None:
        """torch.optim.AdamW's update (its functional form, so the math is torch's own)."""
        params, grads, m, v, vmax, steps = [], [], [], [], [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self._state_of(p, g, lambda: torch.tensor(0.0, dtype=torch.float32))
            params.append(p)
            grads.append(p.grad)
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            if g["amsgrad"]:
                vmax.append(st["max_exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return
        b1, b2 = g["betas"]
        _adamw(params, grads, m, v, vmax, steps, foreach=g["foreach"], capturable=False, differentiable=False,
               fused=None, grad_scale=None, found_inf=None, has_complex=any(torch.is_complex(p) for p in params),
               amsgrad=g["amsgrad"], beta1=b1, beta2=b2, lr=g["lr"], weight_decay=g["weight_decay"], eps=g["eps"],
               maximize=g["maximize"])

    def _sparse_step(self, g: Dict[str, Any], rows: Dict[torch.device, Tensor]) -> None:
        """The lazy update of the module docstring on the touched rows; the other rows are never written."""
        lr, eps, wd = g["lr"], g["eps"], g["weight_decay"]
        b1, b2 = g["betas"]
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self._state_of(p, g, lambda: torch.zeros(p.shape[0], dtype=torch.float32, device=p.device))
            if st["step"].device != p.device:   # load_state_dict leaves "step" where it was saved
                st["step"] = st["step"].to(p.device)
            idx = rows[p.device]
            if idx.numel() == 0:
                continue
            view = (-1,) + (1,) * (p.dim() - 1)
            t = st["step"].index_select(0, idx) + 1
            grad = p.grad.index_select(0, idx)
            if g["maximize"]:
                grad = -grad
            w = p.index_select(0, idx)
            m = st["exp_avg"].index_select(0, idx)
            v = st["exp_avg_sq"].index_select(0, idx)
            w.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            if g["amsgrad"]:
                vmax = torch.maximum(st["max_exp_avg_sq"].index_select(0, idx), v)
                st["max_exp_avg_sq"].index_copy_(0, idx, vmax)
                v_used = vmax
            else:
                v_used = v
            step_size, bc2_sqrt = _bias_corrections(lr, b1, b2, t)
            denom = (v_used.sqrt() / bc2_sqrt.view(view)).add_(eps)
            w.add_(step_size.neg_().view(view) * m / denom)      # torch's addcdiv_(m, denom, value=-step_size)
            p.index_copy_(0, idx, w)
            st["exp_avg"].index_copy_(0, idx, m)
            st["exp_avg_sq"].index_copy_(0, idx, v)
            st["step"].index_copy_(0, idx, t)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """As torch's; for a paged model without the row-sparse tensors' state (in the user store) and with the
        epoch that tags this optimizer's moments there."""
        sd = super().state_dict()
        slots = self._slots()
        if slots is not None:
            idx, sparse = 0, set()
            for g in self.param_groups:
                for _ in g["params"]:
                    if g["row_sparse"]:
                        sparse.add(idx)
                    idx += 1
            sd["state"] = {k: v for k, v in sd["state"].items() if k not in sparse}
            sd["proper_epoch"] = slots.epoch
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch's, and the file must have this optimizer's group layout (which groups are row-sparse) and a
        step count per row for every row-sparse tensor."""
        slots, epoch = self._slots(), state_dict.get("proper_epoch")
        if (slots is None) != (epoch is None):
            raise ValueError(f"ProperAdamW.load_state_dict: the state dict was saved from a "
                             f"{'paged' if epoch is not None else 'dense'} model and this one is "
                             f"{'paged' if slots is not None else 'dense'} (resident_users); the per-user moments "
                             f"cannot move between dense tables and slots")
        if slots is not None:   # the row-sparse moments come from the user store, by epoch
            state_dict = {k: v for k, v in state_dict.items() if k != "proper_epoch"}
        layout = [(g["row_sparse"], g["name"]) for g in self.param_groups]
        saved = [(bool(g.get("row_sparse", False)), g.get("name", "")) for g in state_dict.get("param_groups", [])]
        if saved != layout:
            raise ValueError(f"ProperAdamW.load_state_dict: the state dict's groups {saved} (row_sparse, name) do "
                             f"not match this optimizer's {layout}; was it saved by another optimizer or stage?")
        super().load_state_dict(state_dict)
        if slots is not None:
            slots.attach_optimizer(self, epoch=epoch)
            return
        for g in self.param_groups:
            if not g["row_sparse"]:
                continue
            for p in g["params"]:
                step = self.state.get(p, {}).get("step")
                if step is not None and tuple(step.shape) != (p.shape[0],):
                    raise ValueError(f"ProperAdamW.load_state_dict: a row-sparse tensor of group {g['name']!r} "
                                     f"needs a step count per row, shape ({p.shape[0]},), got {tuple(step.shape)}")


def make_optimizer(model: nn.Module, lr: float = 1e-3, *, user_lr: Optional[float] = None,
                   router_lr: Optional[float] = None, **adamw_kwargs) -> ProperAdamW:
    """A :class:`ProperAdamW` over the model's trainable parameters (requires_grad=True now: build one per stage).

    Groups (empty ones left out): ``shared`` (population, experts, anything else trainable) at ``lr``;
    ``routers`` (the routers' dense tensors, ProperLinear.ROUTER_PARTS) at ``router_lr``; ``users`` (user_a,
    user_b: row-sparse) at ``user_lr``; ``router_rows`` (the user-aware router's per-user embedding: row-sparse)
    at ``router_lr``. ``user_lr`` / ``router_lr`` None: ``lr``. ``adamw_kwargs``: betas, eps, weight_decay
    (default 1e-2, as torch.optim.AdamW), amsgrad, maximize, foreach.
    """
    state = get_state(model)
    rows, routers = set(), set()
    for layer in state.layers.values():
        ts = layer.adapter_tensors()
        rows.update(id(ts[k]) for k in USER_ROW_KEYS if k in ts)
        routers.update(id(p) for part in ProperLinear.ROUTER_PARTS for p in layer.part_parameters(part))
    groups: Dict[str, List[nn.Parameter]] = {n: [] for n in _GROUP_NAMES}
    for p in model.parameters():
        if p.requires_grad:
            sparse, router = id(p) in rows, id(p) in routers
            groups[("router_rows" if router else "users") if sparse else ("routers" if router else "shared")].append(p)
    if not any(groups.values()):
        raise ValueError("proper.make_optimizer: the model has no trainable parameters (requires_grad=True); call "
                         "proper.set_stage(model, stage) first")
    rates = {"shared": lr, "routers": router_lr, "users": user_lr, "router_rows": router_lr}
    param_groups = [{"params": ps, "name": n, "row_sparse": n in ("users", "router_rows"),
                     "lr": lr if rates[n] is None else rates[n]} for n, ps in groups.items() if ps]
    return ProperAdamW(param_groups, lr=lr, model=model, **adamw_kwargs)


def _bias_corrections(lr: float, b1: float, b2: float, t: Tensor):
    """Per row, (lr / (1 - b1^t), sqrt(1 - b2^t)) as fp32 [n]. Formed in fp64 as torch.optim.AdamW forms its
    Python floats, so a row with torch's step count gets torch's numbers (in fp32, 1 - 0.999^t would lose ~4
    digits); fp32 via expm1 where the device has no fp64 (MPS)."""
    if t.device.type == "mps":
        bc1 = -torch.expm1(t * math.log(b1)) if b1 > 0 else torch.ones_like(t)
        bc2 = -torch.expm1(t * math.log(b2)) if b2 > 0 else torch.ones_like(t)
        return lr / bc1, bc2.sqrt()
    td = t.double()
    bc1 = 1.0 - torch.pow(b1, td)
    bc2 = 1.0 - torch.pow(b2, td)
    return (lr / bc1).float(), bc2.sqrt().float()


def _check_hyper(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"ProperAdamW: argument {name!r} must be a finite number >= 0, got {value!r}")


def _check_betas(betas) -> None:
    try:
        b1, b2 = betas
        ok = all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in (b1, b2))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"ProperAdamW: argument 'betas' must be two numbers in [0, 1), got {betas!r}")
