"""The CUDA backend on a machine without a GPU.

1. nvcc compiles every csrc/cuda/*.cu for real (sm_80 and sm_90) through .ci/compile_cuda.sh.
2. The same kernels, launchers and torch binding run on the host emulator (csrc/cuda/host_emu: every CUDA thread
   a fiber, real __syncthreads / warp-shuffle semantics) over CPU tensors, through proper_kernels/cuda.py and the
   routed_lora custom op, and are checked against the fp64 oracle like every other backend (tests/cases.py).

What the emulator cannot show: timing, races between blocks (blocks run one at a time), and device-only issues
(occupancy, alignment faults of real vector loads, atomics contention). Those need a GPU.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

import proper_kernels as pk
import proper_kernels.cuda as pk_cuda
from cases import POPULARITY, VARIANTS, check_backend, grad_out_for, make_case

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
KERNEL_FILES = sorted(p.name for p in (CSRC / "cuda").glob("*.cu"))


def _nvcc():
    return shutil.which(os.environ.get("NVCC", "nvcc"))


# ------------------------------------------------------------------------------------------ nvcc, for real
@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed (the CUDA toolkit): cannot compile csrc/cuda")
def test_cuda_sources_compile_with_nvcc():
    env = dict(os.environ, PROPER_CUDA_ARCHS="80;90", PROPER_NVCC_VERBOSE="0")
    r = subprocess.run(["bash", str(ROOT / ".ci" / "compile_cuda.sh")], capture_output=True, text=True,
                       timeout=1800, cwd=ROOT, env=env)
    print(r.stdout)
    assert r.returncode == 0, f"nvcc failed:\n{r.stdout}\n{r.stderr}"
    for name in KERNEL_FILES:
        assert f"compiled csrc/cuda/{name} for sm_80 sm_90" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------ host emulator
def _cuda_include():
    nvcc = _nvcc()
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return str(Path(c) / "include")
    return None


def _write_if_changed(path: Path, text: str):
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


@pytest.fixture(scope="module")
def emu():
    """Build (or reuse) the emulated extension: the real .cu files compiled as C++ plus the real binding."""
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers (cuda_runtime.h) not found: set CUDA_HOME to build the host emulator")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not installed (torch.utils.cpp_extension.load needs it)")

    tag = hashlib.sha1(f"{torch.__version__}|{ROOT}".encode()).hexdigest()[:10]
    build = Path(os.environ.get("PROPER_EMU_BUILD_DIR",
                                Path.home() / ".cache" / "proper_kernels" / f"cuda_emu_{tag}"))
    build.mkdir(parents=True, exist_ok=True)
    _drop_stale_lock(build / "lock")
    emu_h = CSRC / "cuda" / "host_emu" / "cuda_emu.h"
    sources = []
    for name in KERNEL_FILES:   # one translation unit per .cu file, as nvcc compiles them
        src = build / f"emu_{Path(name).stem}.cpp"
        _write_if_changed(src, f'#include "{emu_h}"\n#include "{CSRC / "cuda" / name}"\n')
        sources.append(str(src))
    binding = build / "emu_binding.cpp"
    _write_if_changed(binding, f'#include "{CSRC / "cuda_binding.cpp"}"\n'
                               f'#include "{CSRC / "cuda" / "host_emu" / "emu_module.cpp"}"\n')
    sources += [str(binding), str(CSRC / "cuda" / "host_emu" / "emu_runtime.cpp")]
    return cpp_extension.load(
        name="proper_cuda_emu", sources=sources, build_directory=str(build), verbose=False,
        extra_cflags=["-O1", "-DPROPER_CUDA_EMULATE", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
        extra_include_paths=[str(CSRC), inc])


# cpp_extension.load's FileBaton leaves `lock` behind when a build is killed, and every later build then waits on
# it forever. No build of these few files holds the lock this long, so an older one belongs to a dead run.
_STALE_LOCK_S = 20 * 60


def _drop_stale_lock(lock):
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_S:
        warnings.warn(f"removing a stale build lock {lock} ({age / 60:.0f} min old, left by a killed build)")
        lock.unlink(missing_ok=True)


class _WithBlocks:
    """The emulated module with other segment-table block sizes (the kernels accept any)."""

    def __init__(self, mod, block, reduce_block):
        self._mod = mod
        self.cuda_block_tokens = block
        self.cuda_reduce_block_tokens = reduce_block

    def __getattr__(self, name):
        return getattr(self._mod, name)


@pytest.fixture
def on_host(emu, monkeypatch):
    """Route backend="cuda" on CPU tensors to the emulated kernels for the duration of one test."""
    monkeypatch.setattr(pk_cuda, "_module_override", emu)
    monkeypatch.setattr(pk_cuda, "unavailable_reason", lambda device: None)
    pk.op._resolve.cache_clear()
    yield emu
    pk.op._resolve.cache_clear()


@pytest.mark.parametrize("popularity", POPULARITY)
def test_emulated_popularity_fp32(on_host, popularity):
    check_backend("cuda", make_case(T=37, popularity=popularity, seed=3), f"cuda-emu/{popularity}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("popularity", ["zipf", "half_none"])
def test_emulated_low_precision(on_host, dtype, popularity):
    check_backend("cuda", make_case(T=37, popularity=popularity, dtype=dtype, seed=3), f"cuda-emu/{dtype}")


@pytest.mark.parametrize("K", [0, 1, 8])
@pytest.mark.parametrize("T", [1, 70])
def test_emulated_shapes_scalar_paths(on_host, K, T):
    """Odd d_in / d_out, r_e = 16, r_max = 64: scalar loads, several rank tiles, several expert chunks."""
    check_backend("cuda", make_case(T=T, d_in=67, d_out=33, K=K, U=9, r_max=64, r_e=16, seed=T + K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emulated_vector_paths(on_host, dtype):
    """d_in, d_out, r_e, r_max multiples of 8: every 16-byte / 4-element vector path."""
    check_backend("cuda", make_case(T=29, d_in=64, d_out=48, K=3, r_e=8, U=5, r_max=16, dtype=dtype, seed=5))


@pytest.mark.parametrize("d", [2049, 2048])
def test_emulated_split_reductions(on_host, d):
    """Long d_in / d_out: the shrinks split the reduction over several blocks (partials summed in rank space)."""
    check_backend("cuda", make_case(T=5, d_in=d, d_out=d, K=2, r_e=4, U=3, r_max=8, seed=7))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_emulated_variants(on_host, variant):
    kw = VARIANTS[variant]
    check_backend("cuda", make_case(T=41, **kw), f"cuda-emu/{variant}")


@pytest.mark.parametrize("block,reduce_block", [(4, 8), (1, 1), (64, 5)])
def test_emulated_block_sizes(on_host, monkeypatch, block, reduce_block):
    """Segment tables with tiny and huge blocks: many blocks per user, many reduction chunks per user."""
    monkeypatch.setattr(pk_cuda, "_module_override", _WithBlocks(on_host, block, reduce_block))
    check_backend("cuda", make_case(T=41, popularity="zipf", seed=11), f"cuda-emu/blocks{block},{reduce_block}")


def test_emulated_empty_groups_and_unused_users(on_host):
    case = make_case(T=20, K=6, U=10, top_k=2)
    case["gates"][:, 4:] = 0
    case["user_ids"] = case["user_ids"] % 3
    check_backend("cuda", case)


def test_emulated_forward_is_deterministic(on_host):
    case = make_case(T=33, popularity="uniform", dtype=torch.bfloat16, seed=2)
    args = [case[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
    kw = dict(user_ranks=case["user_ranks"], expert_scale=case["expert_scale"], user_scale=case["user_scale"],
              user_weight=case["user_weight"], backend="cuda")
    y1, y2 = pk.routed_lora(*args, **kw), pk.routed_lora(*args, **kw)
    assert torch.equal(y1, y2)


def test_emulated_binding_checks_its_invariants(on_host):
    """The binding refuses tensors cuda.py would never pass (wrong dtype, non-contiguous) instead of misreading."""
    case = make_case(T=8, seed=1)
    x = case["x"]
    with pytest.raises(RuntimeError, match="gates must be Float"):
        on_host.cuda_forward(x, case["expert_a"], case["expert_b"], case["gates"].double(), None, None, None,
                             None, 1.0, None, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        on_host.cuda_forward(x.t().contiguous().t(), case["expert_a"], case["expert_b"], case["gates"], None, None,
                             None, None, 1.0, None, None, None, None, None, None)
    go = grad_out_for(case, case["expert_b"].shape[1]).float()
    with pytest.raises(RuntimeError, match="user gradients need users"):
        on_host.cuda_backward(go, x, case["expert_a"], case["expert_b"], case["gates"], None, None, None, None,
                              1.0, None, None, None, None, None, None, None, None, None,
                              [False, False, False, False, True, False, False])


def test_emulated_launcher_rejects_missing_layout(on_host):
    """Without the token layout the launcher itself refuses users (cudaErrorInvalidValue), it never guesses."""
    case = make_case(T=8, K=0, seed=1)
    with pytest.raises(RuntimeError, match="forward failed: invalid argument"):
        on_host.cuda_forward(case["x"], None, None, None, case["user_a"], case["user_b"],
                             case["user_ids"].int(), None, 1.0, None, None, None, None, None, None)
