"""The Triton backend: token layout metadata, GPU compilation of every kernel, and the interpreter grid.

Triton kernels run on CPU only through Triton's interpreter, and TRITON_INTERPRET=1 must be set before triton is
imported: the forward/backward grid (tests/triton_grid.py) therefore runs in a subprocess with that variable.
The layout tests need no triton at all.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import proper_kernels as pk
from cases import make_case, user_ids_for
from proper_kernels import layout

ROOT = Path(__file__).resolve().parents[2]
GRID_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------------- layout
def _check_layout(ids: torch.Tensor, U: int, block: int):
    T = ids.shape[0]
    lay = layout.token_layout(ids, U)
    order = lay.order
    assert sorted(order.tolist()) == list(range(T))                          # a permutation of the tokens
    key = torch.where(ids < 0, U, ids.long())
    counts = torch.bincount(key, minlength=U + 1)
    assert lay.seg_len.tolist() == counts.tolist()
    assert lay.seg_start.tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    for s in range(U + 1):                                                   # each segment: one user, in order
        seg = order[lay.seg_start[s]: lay.seg_start[s] + lay.seg_len[s]]
        assert (key[seg] == s).all() and (seg.diff() > 0).all()              # stable: token order kept

    for include in (False, True):
        nseg = U + 1 if include else U
        bt = layout.block_table(lay, U, block, include_no_user=include)
        assert bt.block_user.shape[0] == max(1, layout.max_blocks(T, nseg, block))   # static size
        covered = torch.zeros(T, dtype=torch.long)
        active = bt.block_user >= 0
        if active.any():  # idle programs only trail the active ones
            assert active[: int(active.sum())].all()
        for u, a, b in zip(bt.block_user.tolist(), bt.block_start.tolist(), bt.block_end.tolist()):
            if u < 0:
                continue
            assert 0 < b - a <= block and 0 <= u < nseg
            toks = order[a:b]
            assert (key[toks] == u).all()                                    # a block holds one user's tokens
            covered[toks] += 1
        want = (key < U).long() if not include else torch.ones(T, dtype=torch.long)
        assert torch.equal(covered, want)                                    # every token exactly once

    act = layout.active_users(lay, U)
    n = max(1, min(T, U))
    present = sorted(set(ids[ids >= 0].tolist()))
    assert act.shape == (n,) and act.tolist() == present + [-1] * (n - len(present))


@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf", "identical", "half_none", "one_hot"])
@pytest.mark.parametrize("T, U, block", [(1, 3, 16), (37, 6, 4), (133, 9, 16), (50, 5, 1), (7, 10_000, 16),
                                         (64, 2, 64)])
def test_layout_covers_every_token_once(popularity, T, U, block):
    ids = user_ids_for(popularity, T, U, torch.Generator().manual_seed(T + U))
    _check_layout(ids, U, block)


def test_layout_edge_cases():
    _check_layout(torch.full((9,), -1), 4, 4)                                  # nobody has a user
    _check_layout(torch.full((9,), -1), 0, 4)                                  # no user table at all
    _check_layout(torch.zeros(0, dtype=torch.long), 5, 16)                     # no tokens
    _check_layout(torch.tensor([3, 3, 3, 3, 3, 0], dtype=torch.int32), 4, 2)  # int32 ids, exact multiples


# ------------------------------------------------------------------------------------------- availability
def test_import_does_not_load_the_backend():
    # (torch's custom_op machinery may import triton itself; our kernels must still load only on first use)
    code = ("import sys, proper_kernels; "
            "assert not any(m.startswith('proper_kernels.triton') for m in sys.modules), 'backend loaded eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_unavailable_reason_on_plain_cpu(monkeypatch):
    pytest.importorskip("triton")
    from proper_kernels import triton as tb

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = tb.unavailable_reason(torch.device("cpu"))
    assert reason and "TRITON_INTERPRET" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.unavailable_reason(torch.device("cpu")) is None
    assert tb.unsupported_reason(torch.float64) and tb.unsupported_reason(torch.bfloat16) is None


# ------------------------------------------------------------------------------------- GPU compilation
_TL_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
             torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's arguments instead of running it."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **constexprs):
            self.calls.append((self.fn, args, constexprs, num_warps))
        return launch


def _compile(fn, args, constexprs, num_warps, target):
    import triton
    from triton.compiler import ASTSource

    sig = {}
    for name, a in zip(fn.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _TL_TYPES[a.dtype]
        elif isinstance(a, int):
            sig[name] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
        else:
            sig[name] = "fp32"
    sig.update({name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                          options={"num_warps": num_warps})


@pytest.mark.parametrize("variant", ["bf16_all", "fp32_experts_only", "fp16_users_only_plain"])
def test_kernels_compile_for_gpus(variant, monkeypatch):
    """Every kernel specialization a forward + backward launches compiles to sm_80 / sm_90 machine code.

    The interpreter grid proves the math; this catches what only the GPU compiler rejects (loop-carried type
    changes, scalar/tensor mixing, dot shapes). Needs triton's bundled ptxas, no GPU.
    """
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted functions in this process")
    from triton.backends.compiler import GPUTarget

    from proper_kernels import triton as tb
    from proper_kernels.triton import kernels

    kw = {"bf16_all": dict(dtype=torch.bfloat16),
          "fp32_experts_only": dict(users=False),
          "fp16_users_only_plain": dict(dtype=torch.float16, K=0, ranks="full", nan_pad=False, user_weight=False,
                                        user_scale=None)}[variant]
    c = make_case(T=9, **kw)
    p = pk.validate(c["x"], c["expert_a"], c["expert_b"], c["gates"], c["user_a"], c["user_b"], c["user_ids"],
                    user_ranks=c.get("user_ranks"), expert_scale=c.get("expert_scale", 1.0),
                    user_scale=c.get("user_scale"), user_weight=c.get("user_weight"))
    calls = []
    for name in ("shrink_kernel", "expand_kernel", "wgrad_kernel", "gate_grad_kernel"):
        monkeypatch.setattr(kernels, name, _Recorder(getattr(kernels, name), calls))
    tb.forward(p)
    tb.backward(torch.zeros(p.x.shape[0], p.d_out, dtype=p.x.dtype), p, tuple(g is not None for g in
                                                                                 p.differentiable()))
    assert {fn.__name__ for fn, *_ in calls} >= {"shrink_kernel", "expand_kernel", "wgrad_kernel"}
    seen = set()
    for target in (GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)):
        for fn, args, constexprs, num_warps in calls:
            key = (target.arch, fn.__name__, tuple(sorted(constexprs.items())),
                   tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a) for a in args))
            if key in seen:
                continue
            seen.add(key)
            try:
                compiled = _compile(fn, args, constexprs, num_warps, target)
            except (FileNotFoundError, RuntimeError) as e:  # no usable ptxas in this install
                if "ptxas" in str(e):
                    pytest.skip(f"triton cannot assemble here: {e}")
                raise
            assert compiled.asm.get("cubin"), (fn.__name__, target)


# ------------------------------------------------------------------------------------- interpreter grid
@pytest.mark.triton
def test_interpreter_grid():
    """Forward + every gradient vs the fp64 oracle under TRITON_INTERPRET=1 (tests/triton_grid.py)."""
    pytest.importorskip("triton", reason="triton is not installed")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "triton_grid.py")]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=GRID_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"interpreter grid timed out after {GRID_TIMEOUT_S}s:\n{out[-8000:]}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"interpreter grid failed (rc {res.returncode}):\n{out[-12000:]}"
    assert " passed" in out and "skipped" not in out.splitlines()[-1], out[-3000:]
    print(f"interpreter grid: {out.strip().splitlines()[-1]} ({time.time() - t0:.0f}s)")
