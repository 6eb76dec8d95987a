#!/usr/bin/env bash
# Compile every CUDA source for real with nvcc, for each target architecture (default sm_80 and sm_90, the
# archs setup.py builds), without a GPU and without a CUDA build of torch: csrc/cuda/*.cu include CUDA headers
# only. Objects go to a temporary folder that is removed afterwards. Also checks that the public header
# csrc/cuda/routed_lora.cuh compiles as plain host C++ (the torch binding includes it from a .cpp file).
#
#   bash .ci/compile_cuda.sh             exits non-zero on any compile error or warning (-Werror all-warnings)
#   PROPER_CUDA_ARCHS="80;90"            the architectures (semicolon separated), as in setup.py
#   PROPER_NVCC_VERBOSE=1                also print ptxas register / spill / smem usage of every kernel
#   PROPER_SKIP_NVCC=1                   exit 0 with a message when nvcc is not installed (default: exit 1)
#   NVCC=/path/to/nvcc                   the compiler (default: nvcc on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  if [ "${PROPER_SKIP_NVCC:-0}" = "1" ]; then
    echo "compile_cuda: nvcc not found on PATH; skipped (PROPER_SKIP_NVCC=1)"
    exit 0
  fi
  echo "compile_cuda: nvcc not found on PATH: install the CUDA toolkit (or set NVCC=/path/to/nvcc)," \
       "or set PROPER_SKIP_NVCC=1 to skip this check" >&2
  exit 1
fi

IFS=';' read -r -a archs <<< "${PROPER_CUDA_ARCHS:-80;90}"
gencode=()
label=""
for a in "${archs[@]}"; do
  gencode+=("-gencode=arch=compute_${a},code=sm_${a}")
  label+="${label:+ }sm_${a}"
done
# the flags of setup.py's nvcc step and those torch's BuildExtension adds (no implicit half / bfloat16
# conversions or operators), plus warnings as errors
flags=(-std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Werror all-warnings -Icsrc
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__)
[ "${PROPER_NVCC_VERBOSE:-0}" = "1" ] && flags+=(-Xptxas -v)

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "compile_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"

status=0
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda: no csrc/cuda/*.cu found" >&2
  exit 1
fi
for src in "${sources[@]}"; do
  obj="$out/$(basename "$src" .cu).o"
  start=$SECONDS
  if "$NVCC" "${flags[@]}" "${gencode[@]}" -c "$src" -o "$obj"; then
    echo "compiled $src for $label in $((SECONDS - start))s"
  else
    echo "FAILED: $src ($label)" >&2
    status=1
  fi
done

# The public header must stay plain host C++ (no device code, no torch).
cuda_inc="$(dirname "$(command -v "$NVCC")")/../include"
[ -d "${CUDA_HOME:-}/include" ] && cuda_inc="$CUDA_HOME/include"
[ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=/usr/local/cuda/include
CXX=${CXX:-c++}
if command -v "$CXX" >/dev/null 2>&1; then
  if printf '#include "cuda/routed_lora.cuh"\n' |
      "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -x c++ -Icsrc -I"$cuda_inc" -; then
    echo "compiled csrc/cuda/routed_lora.cuh as host C++ ($CXX)"
  else
    echo "FAILED: csrc/cuda/routed_lora.cuh is not plain host C++" >&2
    status=1
  fi
fi

if [ $status -ne 0 ]; then
  echo "compile_cuda: FAILED" >&2
else
  echo "compile_cuda: OK (${#sources[@]} files)"
fi
exit $status
