#!/usr/bin/env bash
# Runs the test suite (what CI runs). Creates and fills .venv on first use.
#   ./scripts/test.sh [pytest arguments]     e.g. ./scripts/test.sh tests/data -x
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec python -m pytest -q "$@"
