"""Benchmark providers: ways to compute the same routed multi-LoRA delta for one layer.

Each provider is `make(case, kw) -> callable | None` (None: the provider cannot run that case, e.g. peft has no
group experts). The callable runs the forward, or forward + backward for training cases.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Optional

import torch

import proper_kernels as pk
from proper_kernels.baselines import naive_loop

ARGS = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")
DIFF = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_weight")


def _with_grad(kw):
    kw = dict(kw)
    for k in DIFF:
        if kw.get(k) is not None:
            kw[k] = kw[k].detach().clone().requires_grad_()
    return kw


def _runner(fn, case, kw) -> Callable[[], object]:
    """Forward, or forward + backward, of fn(*ARGS, **rest)."""
    if case.training:
        kw = _with_grad(kw)
    args = [kw[k] for k in ARGS]
    rest = {k: v for k, v in kw.items() if k not in ARGS}
    if not case.training:
        def fwd():
            with torch.no_grad():
                return fn(*args, **rest)
        return fwd

    def fwd_bwd():
        for k in DIFF:
            if kw.get(k) is not None:
                kw[k].grad = None
        fn(*args, **rest).sum().backward()
    return fwd_bwd


def backend_provider(name: str, **options):
    """routed_lora with `backend=name`; options go to every call (e.g. check_values=False, as the model layer)."""
    def make(case, kw):
        return _runner(lambda *a, **k: pk.routed_lora(*a, **k, backend=name, **options), case, kw)
    return make


def naive_provider(case, kw):
    return _runner(naive_loop, case, kw)


def _peft_model(case, kw, n_adapters: int):
    """A one-layer model with `n_adapters` peft LoRA adapters holding the users' weights (full r_max)."""
    from peft import LoraConfig, get_peft_model

    d = case.d
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(d, d, bias=False))
    model = None
    r = case.user_rank
    for i in range(n_adapters):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0)
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=f"u{i}")
        else:
            model.add_adapter(f"u{i}", cfg)
        with torch.no_grad():
            layer = model.base_model.model.proj
            layer.lora_A[f"u{i}"].weight.copy_(torch.nan_to_num(kw["user_a"][i]))
            layer.lora_B[f"u{i}"].weight.copy_(torch.nan_to_num(kw["user_b"][i]))
    return model.to(device=kw["x"].device, dtype=kw["x"].dtype).eval()   # where the inputs live (GPU, bf16)


def peft_mixed_provider(case, kw) -> Optional[Callable]:
    """peft's mixed-adapter batch (adapter_names=...): plain multi-user LoRA only (no experts in peft)."""
    if case.K != 0 or case.training:    # peft cannot train a mixed-adapter batch
        return None
    ids = kw["user_ids"]
    present = torch.unique(ids).tolist()
    model = _peft_model(case, kw, max(present) + 1)
    names = [f"u{i}" for i in ids.tolist()]
    x = kw["x"][:, None, :]                                  # [T, 1, d]: one sequence per token

    def fwd():
        with torch.no_grad():
            return model(x, adapter_names=names)
    return fwd


def peft_single_provider(case, kw) -> Optional[Callable]:
    """One peft adapter for the whole batch: the cost floor of a plain LoRA (not personalised)."""
    if case.K != 0:
        return None
    model = _peft_model(case, kw, 1)
    x = kw["x"]
    if case.training:
        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            model(x.requires_grad_()).sum().backward()
        return fwd_bwd

    def fwd():
        with torch.no_grad():
            return model(x)
    return fwd


def providers(device: str = "cpu", with_peft: bool = True) -> Dict[str, Callable]:
    out = {f"ours-{b}": backend_provider(b) for b in pk.available_backends(device)}
    out["naive-loop"] = naive_provider
    if with_peft and importlib.util.find_spec("peft") is not None:
        out["peft-mixed"] = peft_mixed_provider
        out["peft-single"] = peft_single_provider
    return out
