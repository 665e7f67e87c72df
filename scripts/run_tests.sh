#!/usr/bin/env bash
# Set everything up, then run the whole test suite (CPU, gloo ranks on this machine) on both
# supported megatron-core versions: 0.19.2 (.venv, Python 3.12) and 0.16.1 (.venv-mcore016,
# Python 3.11). This is what CI runs. MCORE=0.19 or MCORE=0.16 runs one of them; extra arguments
# go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for mcore in ${MCORE:-0.19 0.16}; do
  python=$(MCORE=$mcore bash scripts/setup_env.sh | tail -n 1) || exit 1
  echo "== megatron-core $mcore: $python -m pytest"
  "$python" -m pytest -q -ra "$@" || status=1
done
exit $status
