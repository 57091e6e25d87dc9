#!/usr/bin/env bash
# The main job on the synthetic dataset (data -> train -> eval -> export -> predict).
# Creates and fills .venv on first use.   ./scripts/demo.sh [--workdir=runs/demo]
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec python -m deeplab2_kmax.demo "$@"
