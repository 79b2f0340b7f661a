#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job (absparse run) with $PYTHON (default python3),
# like setup.sh and test.sh. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m absparse.eval.cli run "$@"
