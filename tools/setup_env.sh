#!/usr/bin/env bash
# Create .venv (if missing) and install mst-megatron with its test extras.
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0: the CPU build these
# machines keep on local disk) so that resolving megatron-core never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
log=$(mktemp)
pip_install() {
  if ! .venv/bin/python -m pip install "$@" >"$log" 2>&1; then
    cat "$log"; echo "setup_env: pip install $* failed" >&2; exit 1
  fi
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
pip_install "$TORCH_SPEC"
pip_install -e ".[test]"
.venv/bin/python -c "
import torch, mst_megatron
from mst_megatron.runtime.quiet import import_megatron_quietly
import_megatron_quietly()
import megatron.core
print('setup_env: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
