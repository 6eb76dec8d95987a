#!/usr/bin/env bash
# One-command GPU check (issue 17): build the CUDA extension for sm_90, run the Triton and CUDA grids on the GPU
# against the fp64 reference, benchmark the op (decode, prefill, training step at 8 / 64 / 256 users, bf16) and
# SmolLM2 generate for 64 users, and write DIR/gpu_check.json + DIR/gpu_check.md. Planned for an H200 with
# torch, Triton, transformers, peft and nvcc preinstalled and no network: nothing is installed, the extension is
# built in place (python setup.py build_ext --inplace) and imported through PYTHONPATH.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
#   --out DIR    output folder (default gpu_check_out/): log.txt, steps.json, one log per step, env.json,
#                tests.xml (junit), op.json, generate.json, gpu_check.json, gpu_check.md
#   --dry-run    every step's code on the CPU: no build (setup.py only parses), TRITON_INTERPRET=1, a small
#                selection of the grids, tiny shapes (benchmarks/gpu_bench.py --dry-run)
#   PYTHON=...   the interpreter (default: python)
#
# Each step has its own time budget (the sum, with the kill grace, stays under 8 minutes), is logged with
# timestamps to DIR/log.txt and the terminal, and has its exit status recorded in DIR/steps.json; a failed step
# does not stop the later ones. The script exits non-zero if any step failed or timed out.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=gpu_check_out
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt
: > "$LOG"
rm -f "$OUT"/{steps,env,op,generate,gpu_check}.json "$OUT/tests.xml" "$OUT/gpu_check.md"
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1

# time budgets in seconds (sum 460, plus at most 10 s kill grace per step: under the 8 minutes; B_GEN is the
# wait for the background generate step once the op step is done)
B_BUILD=150 B_ENV=30 B_TESTS=100 B_OP=95 B_GEN=70 B_REPORT=15
B_TOTAL=470   # the background generate step's own hard limit
BENCH_FLAGS=()
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 PROPER_GRID_DEVICE=cpu
  unset PROPER_REQUIRE_BACKENDS
  BENCH_FLAGS=(--dry-run)
  # the 8-minute plan is the GPU's; on a loaded 2-core CI machine the interpreter's test step took over 100 s and
  # importing torch for the report over 15 s, so the dry run only proves the steps, with room for load
  B_TESTS=240 B_REPORT=60
  REQUIRE=triton
  TEST_FILES=(tests/kernels/test_triton.py tests/kernels/test_cuda_build.py tests/cli/test_gpu_check.py)
  # the interpreter and the host emulator of the CUDA kernels are slow: a few grid cases of each
  TEST_K="not interpreter_grid and not dry_run_script and not nvcc and (not device_grid or \
triton-pop-distinct-fp32 or triton-variant-users_only-fp32 or triton-many-users-zipf) and \
(not emulated or (popularity_fp32 and (distinct or zipf)))"
else
  unset TRITON_INTERPRET PROPER_GRID_DEVICE
  export PROPER_REQUIRE_BACKENDS=triton,cuda   # on the GPU an unavailable backend fails the grid, never skips
  REQUIRE=triton,cuda
  # test_cuda_build.py runs no kernel on a GPU (nvcc compile + host emulator, both CPU proofs run in CI):
  # the device grid in test_gpu_check.py runs the CUDA and Triton kernels on the GPU instead
  TEST_FILES=(tests/kernels/test_triton.py tests/cli/test_gpu_check.py)
  TEST_K="not interpreter_grid and not dry_run_script"
fi

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG"; }

STEPS=()
FAILED=0
write_steps() {
  local IFS=,
  printf '[%s]\n' "${STEPS[*]}" > "$OUT/steps.json"
}

# run_step NAME BUDGET_S COMMAND...: runs COMMAND under `timeout`, output to DIR/NAME.log, log.txt and the terminal
run_step() {
  local name=$1 budget=$2 rc status start
  shift 2
  log "step $name: start (budget ${budget}s): $*"
  start=$SECONDS
  set +e
  timeout -k 10 "$budget" "$@" 2>&1 | tee "$OUT/$name.log" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  set -e
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  [ "$status" = ok ] || FAILED=1
  STEPS+=("{\"name\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"budget_s\": $budget}")
  write_steps
  log "step $name: $status (rc $rc, $((SECONDS - start))s)"
}

log "gpu_check: out $OUT, dry run $DRY, $($PY --version 2>&1)"

# 4 (started first). SmolLM2 generate, 64 users: base, proper, peft. Loading SmolLM2 and building peft's 64
# adapters take a minute or two of CPU, so this runs in the background from the start; it touches the GPU only
# once the op step is done (op.done), and the script then waits at most B_GEN seconds for it. It records
# "skipped: SmolLM2 weights not installed" (not a failure) when the weights are absent.
rm -f "$OUT/op.done"
GEN_START=$SECONDS
timeout -k 10 $((B_TOTAL - 30)) "$PY" -m benchmarks.gpu_bench generate --out "$OUT" --start-after "$OUT/op.done" \
  "${BENCH_FLAGS[@]}" > "$OUT/generate.log" 2>&1 &
GEN_PID=$!
trap 'kill "$GEN_PID" 2>/dev/null || true' EXIT
log "step generate: started in the background (pid $GEN_PID): prepares on the CPU, runs after the op step"

# 1. the extension, CPU + CUDA kernels for sm_90 (dry run: setup.py only parses its options, nothing is compiled)
if [ "$DRY" = 1 ]; then
  run_step build "$B_BUILD" env PROPER_BUILD_EXT=0 "$PY" setup.py --name
else
  # torch takes CUDA_HOME from nvcc's folder when unset: wrong for a wrapper script such as /usr/local/bin/nvcc
  if [ -z "${CUDA_HOME:-}" ]; then
    nvcc_dir=$(dirname "$(dirname "$(command -v nvcc || echo /none/bin/nvcc)")")
    for c in /usr/local/cuda "$nvcc_dir"; do
      if [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then export CUDA_HOME=$c; break; fi
    done
  fi
  log "build: CUDA_HOME=${CUDA_HOME:-unset}, nvcc $( (nvcc --version || true) | grep -o 'release [0-9.]*' ), torch" \
      "built with CUDA $("$PY" -c 'import torch; print(torch.version.cuda)' 2>&1 | tail -n 1)" \
      "(torch refuses to build against an nvcc of another major version), ninja: $(command -v ninja || echo \
      'absent: the sources compile one by one and may overrun')"
  run_step build "$B_BUILD" env PROPER_BUILD_EXT=1 PROPER_CUDA_ARCHS=90 MAX_JOBS=16 \
    "$PY" setup.py build_ext --inplace
fi

# machine facts; fails when a backend the check needs cannot run (the reason is in env.log)
run_step env "$B_ENV" "$PY" -m benchmarks.gpu_bench env --out "$OUT" --require "$REQUIRE" "${BENCH_FLAGS[@]}"

# 2. Triton and CUDA grids vs the fp64 reference (the grid skips its last cases rather than overrun the budget)
export PROPER_GRID_DEADLINE=$(( $(date +%s) + B_TESTS - 20 ))
run_step tests "$B_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rfEs --junitxml="$OUT/tests.xml" \
  "${TEST_FILES[@]}" -k "$TEST_K"
unset PROPER_GRID_DEADLINE

# 3. the op benchmark (stops starting new cases 15 s before its budget ends, so op.json is complete)
run_step op "$B_OP" "$PY" -m benchmarks.gpu_bench op --out "$OUT" --budget-s $((B_OP - 15)) "${BENCH_FLAGS[@]}"

touch "$OUT/op.done"

# 4 (finished). wait for the background generate step: at most B_GEN seconds from here
log "step generate: waiting (budget ${B_GEN}s)"
deadline=$((SECONDS + B_GEN))
while kill -0 "$GEN_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 1; done
if kill -0 "$GEN_PID" 2>/dev/null; then
  kill "$GEN_PID" 2>/dev/null || true
  wait "$GEN_PID" 2>/dev/null || true
  rc=124
else
  set +e; wait "$GEN_PID"; rc=$?; set -e
fi
tee -a "$LOG" < "$OUT/generate.log"
case $rc in 0) status=ok ;; 124|137|143) status=timeout ;; *) status=failed ;; esac
[ "$status" = ok ] || FAILED=1
STEPS+=("{\"name\": \"generate\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - GEN_START)), \"budget_s\": $B_GEN}")
write_steps
log "step generate: $status (rc $rc, $((SECONDS - GEN_START))s since its start, overlapping the others)"

# 5. JSON + markdown (the report lists itself as ok: it is the step that writes them)
run_step report "$B_REPORT" "$PY" -m benchmarks.gpu_bench report --out "$OUT" "${BENCH_FLAGS[@]}"
log "gpu_check: $([ $FAILED = 0 ] && echo 'all steps ok' || echo 'some steps FAILED'); see $OUT/gpu_check.md"
exit $FAILED
