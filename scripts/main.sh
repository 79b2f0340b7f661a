#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job (absparse run) with $PYTHON (default python3),
# like setup.sh and test.sh. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
# The main job runs on a GPU only where there is one. Without one its CUDA kernels would never
# run, and building them (wherever nvcc is installed) costs minutes of set-up on a 2-core CPU
# (without them: 58 s from a fresh clone, 2026-12-01): the set-up skips them (ABSPARSE_CUDA=OFF)
# unless ABSPARSE_CUDA is set. scripts/test.sh keeps building them where nvcc
# is found, and the wheel's default stays AUTO.
if [ -z "${ABSPARSE_CUDA+x}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export ABSPARSE_CUDA=OFF
fi
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m absparse.eval.cli run "$@"
