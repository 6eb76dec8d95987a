"""The compiled CPU backend beyond the shared grid (tests/test_backends.py), and the package without it.

- With the extension disabled (PROPER_DISABLE_EXT=1, in a subprocess) the package imports, "auto" runs the torch
  backend, and asking for backend="cpu" fails with the reason.
- Realistic shapes (d = 2048), groups large enough to take the packed-weight paths, results independent of the
  thread count (bitwise), every micro-kernel ISA this CPU can run, partial gradient requests, mixed dtypes of the
  small inputs.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import proper_kernels as pk
from cases import DIFF_ARGS, _call, check_backend, grad_out_for, make_case, oracle, run_with_grads

ROOT = Path(__file__).resolve().parents[2]
HAS_CPU = "cpu" in pk.available_backends("cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the compiled cpu backend is not built")


def test_without_extension_subprocess():
    code = textwrap.dedent("""
        import torch, proper_kernels as pk
        assert pk.available_backends("cpu") == ["torch"], pk.available_backends("cpu")
        torch.manual_seed(0)
        x = torch.randn(5, 8); ua = torch.randn(3, 4, 8); ub = torch.randn(3, 6, 4)
        ids = torch.tensor([0, 1, -1, 2, 0])
        y = pk.routed_lora(x, None, None, None, ua, ub, ids)
        ref = pk.routed_lora_reference(x, None, None, None, ua, ub, ids)
        # fp32 defaults of assert_close: the torch backend sums in another order than the reference, so the
        # results differ by rounding (up to ~2e-6 seen); allclose's atol=1e-8 made this test fail 1 run in 11.
        torch.testing.assert_close(y, ref)
        try:
            pk.routed_lora(x, None, None, None, ua, ub, ids, backend="cpu")
        except RuntimeError as e:
            assert "PROPER_DISABLE_EXT" in str(e), str(e)
            print("OK", e)
        else:
            raise AssertionError("backend='cpu' should fail without the extension")
    """)
    env = dict(os.environ, PROPER_DISABLE_EXT="1")
    env.pop("TRITON_INTERPRET", None)  # (the Triton interpreter would make "triton" a CPU backend too)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "OK" in r.stdout, r.stdout


@needs_cpu
def test_isa_reported():
    from proper_kernels import cpu
    isas = cpu.supported_isas()
    assert "generic" in isas and cpu.isa() in isas
    assert isas[0] == cpu.isa() or os.environ.get("PROPER_CPU_ISA")
    if "avx512" not in isas:
        with pytest.raises(RuntimeError, match="cannot run"):
            cpu.set_isa("avx512")
        assert cpu.isa() in isas  # a refused switch keeps the current kernels


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_realistic_decode_shape(dtype):
    """d = 2048, K = 8 experts of rank 16, 64 tokens of 64 distinct users with mixed ranks (NaN padding)."""
    case = make_case(T=64, d_in=2048, d_out=2048, K=8, r_e=16, U=64, r_max=16, popularity="distinct", dtype=dtype,
                     seed=11)
    check_backend("cpu", case, f"decode/{dtype}")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("popularity", ["identical", "zipf", "uniform"])
def test_large_groups_packed_paths(dtype, popularity):
    """Groups with >= 32 tokens (packed B^T / A copies, several token blocks in the weight gradients)."""
    case = make_case(T=300, d_in=200, d_out=136, K=3, r_e=12, U=4, r_max=24, popularity=popularity, dtype=dtype,
                     seed=5)
    check_backend("cpu", case, f"packed/{popularity}/{dtype}")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r_e", [13, 16])
def test_experts_with_few_tokens_packed(dtype, r_e):
    """Decode-sized expert groups (2-5 tokens each) take the packed B^T expand; odd ranks and d_out hit the edges of
    the 8 x 8 transposes (fp32 and bf16)."""
    case = make_case(T=9, d_in=40, d_out=37, K=4, r_e=r_e, U=9, r_max=8, popularity="distinct", dtype=dtype, seed=7)
    check_backend("cpu", case, f"few-token experts/{dtype}/r{r_e}")


@needs_cpu
def test_realistic_prefill_shape_fp32():
    case = make_case(T=256, d_in=2048, d_out=2048, K=8, r_e=16, U=4, r_max=16, ranks="full", nan_pad=False,
                     popularity="uniform", seed=2)
    check_backend("cpu", case, "prefill")


def _all_results(case, go):
    return run_with_grads(pk.routed_lora, case, go, backend="cpu")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["zipf", "decode"])
def test_thread_count_independent(dtype, shape):
    """Bitwise the same results with 1, 2 and 3 threads (the token chunks differ with the thread count)."""
    if shape == "zipf":
        case = make_case(T=290, d_in=70, d_out=50, K=5, r_e=8, U=7, r_max=16, popularity="zipf", dtype=dtype, seed=8)
    else:  # one token per user: the users run as their own tasks
        case = make_case(T=40, d_in=70, d_out=50, K=5, r_e=8, U=40, r_max=16, popularity="distinct", dtype=dtype,
                         seed=8)
    go = grad_out_for(case, 50)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_results(case, go)
        torch.set_num_threads(2)
        two = _all_results(case, go)
        torch.set_num_threads(3)
        three = _all_results(case, go)
    finally:
        torch.set_num_threads(old)
    for k in one:
        assert torch.equal(one[k], two[k]), f"{k} differs between 1 and 2 threads"
        assert torch.equal(one[k], three[k]), f"{k} differs between 1 and 3 threads"


@needs_cpu
def test_every_isa_matches_the_oracle():
    from proper_kernels import cpu
    before = cpu.isa()
    cases = [make_case(T=37, seed=4), make_case(T=133, d_in=67, d_out=33, K=8, U=9, r_max=64, r_e=16, seed=6),
             make_case(T=300, d_in=45, d_out=31, K=2, r_e=5, U=3, r_max=7, popularity="identical", seed=7,
                       dtype=torch.bfloat16)]
    try:
        for isa in cpu.supported_isas():
            assert cpu.set_isa(isa) == isa
            for i, case in enumerate(cases):
                check_backend("cpu", case, f"{isa}/case{i}")
    finally:
        cpu.set_isa(before)


@needs_cpu
@pytest.mark.parametrize("shape", ["decode", "packed", "wide-rank"])
def test_bf16_products_kernels(shape):
    """The vdpbf16ps kernels (ISA avx512bf16: shrink, row-dot expand, bf16-pair packed expand) on their edges: d_in
    with and without a tail of 32, odd ranks and ranks over 32 (several steps, a zero high half in the last pair),
    d_out off the 16-column vectors and the 128-column blocks, odd and even B row strides, and a rank past the
    row-dot's stack copy (the widening fallback). Bounded by the torch reference's own bf16 error, as every
    backend; and close to the widening avx512 kernels."""
    from proper_kernels import cpu
    if "avx512bf16" not in cpu.supported_isas():
        pytest.skip("this CPU has no AVX512-BF16")
    kw = {"decode": dict(T=21, d_in=70, d_out=45, K=3, r_e=33, U=21, r_max=40, popularity="distinct", seed=3),
          "packed": dict(T=200, d_in=96, d_out=150, K=3, r_e=7, U=3, r_max=48, popularity="uniform", seed=4),
          "wide-rank": dict(T=6, d_in=40, d_out=20, K=2, r_e=8, U=6, r_max=300, popularity="distinct", seed=5),
          }[shape]
    case = make_case(dtype=torch.bfloat16, **kw)
    before = cpu.isa()
    try:
        got = {}
        for isa in ("avx512bf16", "avx512"):
            cpu.set_isa(isa)
            check_backend("cpu", case, f"{isa}/{shape}")
            with torch.no_grad():
                got[isa] = _call(pk.routed_lora, case, backend="cpu").float()
    finally:
        cpu.set_isa(before)
    scale = got["avx512"].abs().max().item()
    # the two differ by the rounding of H to bf16 in the expand (and fp32 summation order): a few bf16 ulps
    assert (got["avx512bf16"] - got["avx512"]).abs().max().item() <= 2 ** -6 * scale
    assert not torch.equal(got["avx512bf16"], got["avx512"]) or shape == "wide-rank"


@needs_cpu
@pytest.mark.parametrize("shape", ["decode", "prefill"])
def test_bf16_delta_rounded_in_the_epilogue(shape):
    """A bf16 call rounds its delta block by block in the expand: bitwise torch's .to(bfloat16) of the same fp32
    delta (the out= path keeps it in fp32), for every token (decode: late users only; prefill: chunks of experts and
    packed users), with the widening kernels (the vdpbf16ps ones round H differently on the two paths)."""
    from proper_kernels import cpu
    kw = {"decode": dict(T=23, d_in=50, d_out=300, K=3, r_e=8, U=23, popularity="distinct", seed=13),
          "prefill": dict(T=333, d_in=64, d_out=141, K=4, r_e=8, U=5, popularity="zipf", seed=14)}[shape]
    case = make_case(dtype=torch.bfloat16, **kw)
    before = cpu.isa()
    try:
        for isa in [i for i in cpu.supported_isas() if i != "avx512bf16"]:
            cpu.set_isa(isa)
            with torch.no_grad():
                direct = _call(pk.routed_lora, case, backend="cpu")
                args = [case.get(k) for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
                kws = {k: case[k] for k in ("user_ranks", "expert_scale", "user_scale", "user_weight") if k in case}
                call = pk.prepare_routed_lora(*args, backend="cpu", **kws)   # (out= may be fp32 there)
                fp32 = call(case["x"], out=torch.zeros(kw["T"], kw["d_out"]))
            assert direct.dtype == torch.bfloat16
            assert torch.equal(direct, fp32.to(torch.bfloat16)), isa
    finally:
        cpu.set_isa(before)


@needs_cpu
@pytest.mark.parametrize("which", [("gates",), ("user_weight",), ("x",), ("expert_a", "user_b"), ("user_a",),
                                   ("expert_b", "gates", "user_weight")])
def test_partial_gradients(which):
    """Only some inputs require grad: the backward computes just those, and they match the oracle."""
    case = make_case(T=45, K=4, U=5, seed=9)
    go = grad_out_for(case, case["expert_b"].shape[1])
    exact, _ = oracle(case, go)
    c = {k: (v.detach().clone().requires_grad_(k in which) if k in DIFF_ARGS and v is not None else v)
         for k, v in case.items()}
    y = _call(pk.routed_lora, c, backend="cpu")
    grads = torch.autograd.grad(y, [c[k] for k in which], go.to(y.dtype))
    for k, g in zip(which, grads):
        e = exact["d_" + k]
        assert torch.isfinite(g).all()
        assert (g.double() - e).abs().max() <= 1e-4 * e.abs().max(), k


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(T=70, popularity="zipf"), dict(T=300, K=3, r_e=8, U=4, popularity="identical"),
                                dict(T=31, K=0), dict(T=40, users=False), dict(T=50, popularity="half_none")],
                         ids=["zipf", "packed", "users-only", "experts-only", "half-no-user"])
def test_backward_reads_the_saved_shrink(dtype, kw, monkeypatch):
    """With gradients of B, gates or w to compute, the eager forward keeps A x (cpu.forward_saving) and the backward
    reads it instead of recomputing it: the same kernels on the same plan, so every output and gradient is bitwise
    the recomputing path's."""
    from proper_kernels import cpu, op

    case = make_case(dtype=dtype, seed=21, **kw)
    go = grad_out_for(case, (case.get("expert_b") if case.get("expert_b") is not None else case["user_b"]).shape[1])
    calls = []
    real = cpu.forward_saving
    monkeypatch.setattr(cpu, "forward_saving", lambda p: calls.append(1) or real(p))
    saving = run_with_grads(pk.routed_lora, case, go, backend="cpu")
    assert calls, "the forward did not save A x"
    monkeypatch.setattr(op, "_saves", lambda p, b: False)
    recomputing = run_with_grads(pk.routed_lora, case, go, backend="cpu")
    assert len(calls) == 1
    for k, v in saving.items():
        assert torch.equal(v, recomputing[k]), k


@needs_cpu
def test_custom_op_on_cpu_and_the_saved_check():
    """The traced path (the custom op, whose backward recomputes A x) passes torch.library.opcheck on the cpu
    backend; the backend refuses a `saved` of the wrong size by name."""
    from proper_kernels import cpu
    from proper_kernels.checks import validate

    case = make_case(T=5, d_in=8, d_out=6, K=2, r_e=2, U=3, r_max=4, nan_pad=False)
    args = [case[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids", "user_ranks")]
    args = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in args]
    torch.library.opcheck(torch.ops.proper.routed_lora.default,
                          (*args, 0.5, case["user_scale"], case["user_weight"], "cpu"))
    p = validate(*[t.detach() for t in args[:7]], user_ranks=args[7], expert_scale=0.5,
                 user_scale=case["user_scale"], user_weight=case["user_weight"])
    delta, saved = cpu.forward_saving(p)
    torch.testing.assert_close(delta, cpu.forward(p), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="'saved' must be the"):
        cpu.backward(torch.ones_like(delta), p, [True] * 7, saved=saved[1:])


@needs_cpu
def test_small_input_dtypes_and_out():
    """fp64 gates / bf16 user weight with fp32 x, int32 ids and ranks; gradients come back in each input's dtype;
    out= adds into the given tensor."""
    case = make_case(T=29, K=3, U=4, seed=12)
    case["gates"] = case["gates"].double()
    case["user_weight"] = case["user_weight"].to(torch.bfloat16).float()  # values exact in bf16
    case["user_ids"] = case["user_ids"].int()
    case["user_ranks"] = case["user_ranks"].int()
    check_backend("cpu", case, "dtypes")
    c = dict(case, user_weight=case["user_weight"].to(torch.bfloat16))
    c = {k: (v.detach().requires_grad_() if k in ("gates", "user_weight") else v) for k, v in c.items()}
    y = _call(pk.routed_lora, c, backend="cpu")
    y.sum().backward()
    assert c["gates"].grad.dtype == torch.float64 and c["user_weight"].grad.dtype == torch.bfloat16
    base = torch.randn_like(y.detach())
    out = base.clone()
    res = _call(pk.routed_lora, case, backend="cpu", out=out)
    assert res is out
    assert torch.allclose(out, base + _call(pk.routed_lora, case, backend="torch"), atol=1e-5)


@needs_cpu
def test_auto_picks_cpu_for_fp32_and_bf16_only():
    assert pk.resolve_backend("auto", "cpu", torch.float32) == "cpu"
    assert pk.resolve_backend("auto", "cpu", torch.bfloat16) == "cpu"
    assert pk.resolve_backend("auto", "cpu", torch.float16) == "torch"
    assert pk.resolve_backend("auto", "cpu", torch.float64) == "torch"
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        pk.routed_lora(torch.randn(2, 4, dtype=torch.float64), None, None, None, torch.randn(1, 2, 4).double(),
                       torch.randn(1, 3, 2).double(), torch.zeros(2, dtype=torch.long), backend="cpu")
