#!/usr/bin/env bash
# Set everything up, then run the whole test suite (CPU, gloo ranks on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m pytest -q -ra "$@"
