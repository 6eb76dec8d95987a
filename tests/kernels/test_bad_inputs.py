"""Bad input raises ValueError/TypeError naming the argument, for every backend (checks run before dispatch)."""
import pytest
import torch

import proper_kernels as pk
from cases import make_case

ARGS = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")


def call(case, backend="torch", **over):
    c = {**case, **over}
    kw = {k: c[k] for k in ("user_ranks", "expert_scale", "user_scale", "user_weight", "out") if k in c}
    return pk.routed_lora(*[c[k] for k in ARGS], **kw, backend=backend)


@pytest.fixture
def case():
    return make_case(T=10, d_in=12, d_out=9, K=3, r_e=4, U=4, r_max=5, nan_pad=False)


@pytest.mark.parametrize("over, exc, words", [
    (lambda c: {"x": c["x"][0]}, ValueError, ["'x'", "2-D"]),
    (lambda c: {"x": c["x"].int()}, TypeError, ["'x'", "dtype"]),
    (lambda c: {"expert_a": c["expert_a"][:, :, :-1]}, ValueError, ["'expert_a'", "d_in"]),
    (lambda c: {"expert_b": c["expert_b"][:2]}, ValueError, ["'expert_b'", "K of expert_a"]),
    (lambda c: {"expert_b": c["expert_b"][:, :, :3]}, ValueError, ["'expert_b'", "r_e"]),
    (lambda c: {"expert_a": c["expert_a"].double()}, TypeError, ["'expert_a'", "float64"]),
    (lambda c: {"gates": c["gates"][:-1]}, ValueError, ["'gates'", "T of x"]),
    (lambda c: {"gates": None}, ValueError, ["'gates'"]),
    (lambda c: {"user_a": c["user_a"][:, :, 1:]}, ValueError, ["'user_a'", "d_in"]),
    (lambda c: {"user_b": c["user_b"][:, :-1]}, ValueError, ["'user_b'", "d_out"]),
    (lambda c: {"user_b": c["user_b"][:3]}, ValueError, ["'user_b'", "U of user_a"]),
    (lambda c: {"user_ids": c["user_ids"].float()}, TypeError, ["'user_ids'", "dtype"]),
    (lambda c: {"user_ids": c["user_ids"][:-1]}, ValueError, ["'user_ids'", "T of x"]),
    (lambda c: {"user_ids": torch.full((10,), 4)}, ValueError, ["'user_ids'", "[-1, 4)", "4"]),
    (lambda c: {"user_ids": torch.full((10,), -2)}, ValueError, ["'user_ids'", "-2"]),
    (lambda c: {"user_ranks": torch.tensor([1, 2, 6, 1])}, ValueError, ["'user_ranks'", "[0, 5]", "6"]),
    (lambda c: {"user_ranks": torch.tensor([1, 2, 3])}, ValueError, ["'user_ranks'", "U of user_a"]),
    (lambda c: {"user_scale": float("nan")}, ValueError, ["'user_scale'", "finite"]),
    (lambda c: {"user_scale": torch.tensor([1.0, float("inf"), 1.0, 1.0])}, ValueError, ["'user_scale'"]),
    (lambda c: {"expert_scale": float("inf")}, ValueError, ["'expert_scale'", "finite"]),
    (lambda c: {"user_weight": c["user_weight"][:3]}, ValueError, ["'user_weight'", "T of x"]),
    (lambda c: {"out": torch.zeros(10, 8)}, ValueError, ["'out'", "(10, 9)"]),
    (lambda c: {"user_a": None}, ValueError, ["'user_a'", "together"]),
    (lambda c: {"expert_a": None, "expert_b": None, "gates": None, "user_a": None, "user_b": None,
                "user_ids": None}, ValueError, ["nothing to compute"]),
])
def test_bad_input_names_argument(case, over, exc, words):
    with pytest.raises(exc) as info:
        call(case, **over(case))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_unknown_backend(case):
    with pytest.raises(ValueError, match="'backend'"):
        call(case, backend="tpu")


def test_unavailable_backend_says_why(case):
    with pytest.raises(RuntimeError, match="cuda.*CUDA tensors"):
        call(case, backend="cuda")


def test_meta_device_mismatch(case):
    with pytest.raises(ValueError, match="'gates'.*device"):
        call(case, gates=case["gates"].to("meta"))


def test_available_backends_lists_torch():
    assert "torch" in pk.available_backends("cpu")
    assert pk.available_backends("cpu")[-1] != "cuda"
