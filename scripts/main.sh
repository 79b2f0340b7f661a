#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec absparse run "$@"
