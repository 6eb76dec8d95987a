"""prepare_routed_lora: the bound call equals routed_lora on every backend, forward (with and without out, with
leading dims) and gradients; bad x / out are named; in-place updates of bound tensors are seen."""
from __future__ import annotations

import pytest
import torch

import proper_kernels as pk
from cases import POPULARITY, VARIANTS, _call, backend_supports, grad_out_for, make_case, run_with_grads

BACKENDS = [b for b in ("cpu", "torch") if b in pk.available_backends("cpu")]
ARGS = ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")


def _prepare(case, backend, x=None, **kw):
    args = [case.get(k) for k in ARGS]
    if x is not None:
        args[0] = x
    kwargs = {k: case[k] for k in ("user_ranks", "expert_scale", "user_scale", "user_weight") if k in case}
    return pk.prepare_routed_lora(*args, backend=backend, **kwargs, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["mixed", *VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_call_is_routed_lora_bitwise(backend, variant, dtype):
    if not backend_supports(backend, dtype):
        pytest.skip(f"{backend} does not run {dtype}")
    case = make_case(T=13, d_in=24, d_out=20, dtype=dtype, popularity="half_none", **VARIANTS.get(variant, {}))
    x2 = torch.randn_like(case["x"])
    with torch.no_grad():
        ref = _call(lambda *a, **k: pk.routed_lora(*a, backend=backend, **k), dict(case, x=x2))
        call = _prepare(case, backend)
        assert torch.equal(call(x2), ref)
        y0 = torch.randn(ref.shape, dtype=dtype)
        assert torch.equal(call(x2, out=y0.clone()), y0 + ref)
        # the public call with out: the same bits as delta + out (the cpu kernel adds into out itself)
        got = _call(lambda *a, **k: pk.routed_lora(*a, backend=backend, out=y0.clone(), **k), dict(case, x=x2))
        assert torch.equal(got, y0 + ref)
        # leading dims: [1, T, d_in] in, [1, T, d_out] out
        call3 = _prepare(case, backend, x=case["x"][None])
        assert torch.equal(call3(x2[None], out=y0.clone()[None]), (y0 + ref)[None])
        assert torch.equal(call3(x2[None]), ref[None])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("popularity", POPULARITY)
def test_prepared_call_gradients_are_routed_lora_gradients(backend, popularity):
    case = make_case(T=11, d_in=16, d_out=12, popularity=popularity)
    g = grad_out_for(case, 12)
    ref = run_with_grads(lambda *a, **k: pk.routed_lora(*a, backend=backend, **k), case, g)

    def prepared(*a, **k):   # prepared with detached copies, called on the leaves run_with_grads hands it
        return pk.prepare_routed_lora(*a, backend=backend, **k)(a[0])

    got = run_with_grads(prepared, case, g)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_fp32_out_of_a_bf16_call_gets_the_fp32_delta():
    """adapter_dtype="bfloat16" serving: bf16 inputs, the fp32 delta added into the fp32 base output."""
    case = make_case(T=9, d_in=16, d_out=12, dtype=torch.bfloat16)
    ref = _call(pk.routed_lora_reference, {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                                else v) for k, v in case.items()})
    y0 = torch.randn(9, 12)
    for backend in BACKENDS:
        with torch.no_grad():
            got = _prepare(case, backend)(case["x"], out=y0.clone()) - y0
        err = (got.double() - ref).abs().max() / ref.abs().max()
        # cpu: fp32 accumulation and no bf16 rounding of the delta (<= 1e-5); torch: the delta is rounded to bf16
        # before the add (<= 2^-8 relative)
        assert err < (1e-5 if backend == "cpu" else 2 ** -8), (backend, float(err))


def test_bound_tensors_are_held_by_reference():
    case = make_case(T=7, d_in=8, d_out=6)
    call = _prepare(case, BACKENDS[0])
    before = call(case["x"])
    with torch.no_grad():
        case["user_b"].mul_(2.0)      # an optimizer step / load_state_dict: in place
    after = call(case["x"])
    assert not torch.equal(before, after)
    assert torch.equal(after, _call(pk.routed_lora, case))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("popularity", ["distinct", "zipf", "identical"])
def test_decode_with_the_experts_b_packed_once_is_bitwise_the_packing_kernel(dtype, popularity):
    """The bound cpu call packs the experts' B once (cpu_pack_expert_bt) and the kernel reads it instead of packing
    a block per call: decode shapes (one token per user, a few per expert), several expand blocks with a partial
    last one, fp32 out (bf16 adapters on an fp32 model too). Bitwise the unbound kernel's out + delta; and an
    in-place update of expert_b is seen (the packed copy is rebuilt)."""
    case = make_case(T=16, d_in=72, d_out=200, K=8, r_e=16, U=16, dtype=dtype, popularity=popularity, top_k=2)
    y0 = torch.randn(16, 200)
    with torch.no_grad():
        ref = _call(lambda *a, **k: pk.routed_lora(*a, backend="cpu", **k), case).float() if dtype == torch.float32 \
            else None
        call = _prepare(case, "cpu")
        got = call(case["x"], out=y0.clone())
        unbound = _ext_forward(case, y0.clone())         # the kernel packing B itself
        assert torch.equal(got, unbound)
        if ref is not None:
            assert torch.equal(got, y0 + ref)
        case["expert_b"].mul_(-0.5)
        got2 = call(case["x"], out=y0.clone())
        assert not torch.equal(got2, got)
        assert torch.equal(got2, _ext_forward(case, y0.clone()))


def _ext_forward(case, out):
    from proper_kernels import _ext, cpu
    from proper_kernels.checks import validate
    p = validate(*[case.get(k) for k in ARGS], **{k: case[k] for k in ("user_ranks", "expert_scale", "user_scale",
                                                                         "user_weight") if k in case})
    return _ext.load().cpu_forward(*cpu._args(p), out)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu extension is not built")
def test_a_packed_expert_b_of_the_wrong_size_is_refused_by_name():
    from proper_kernels import _ext, cpu
    from proper_kernels.checks import validate
    case = make_case(T=5, d_in=8, d_out=6, K=2, r_e=4)
    p = validate(*[case.get(k) for k in ARGS], user_ranks=case.get("user_ranks"))
    wrong = _ext.load().cpu_pack_expert_bt(case["expert_b"][:, :5])
    with pytest.raises(RuntimeError, match="'expert_bt' must be cpu_pack_expert_bt"):
        _ext.load().cpu_forward(*cpu._args(p), torch.zeros(5, 6), wrong)


def test_bad_x_and_out_are_named():
    case = make_case(T=7, d_in=8, d_out=6)
    call = _prepare(case, BACKENDS[0])
    with pytest.raises(ValueError, match="argument 'x' must have the shape \\(7, 8\\)"):
        call(case["x"][:5])
    with pytest.raises(ValueError, match="argument 'x' must have the shape .* dtype torch.float32"):
        call(case["x"].double())
    with pytest.raises(ValueError, match="argument 'out' must hold \\[7, 6\\]"):
        call(case["x"], out=torch.zeros(7, 5))
    with pytest.raises(ValueError, match="argument 'user_b'"):   # routed_lora's own checks, at prepare time
        _prepare(dict(case, user_b=case["user_b"][:, :3]), BACKENDS[0])
