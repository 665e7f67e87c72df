#!/usr/bin/env bash
# Create a virtual environment (if missing) and install mst-megatron with its test extras against
# one megatron-core version:
#
#   bash scripts/setup_env.sh          # MCORE=0.19 (default): .venv, Python 3.12, megatron-core 0.19.2
#   MCORE=0.16 bash scripts/setup_env.sh   # .venv-mcore016, Python 3.11, megatron-core 0.16.1
#
# Prints the venv's python on its last line. torch is installed first and pinned (TORCH_SPEC,
# default torch==2.13.0: under Python 3.11 the CPU build these machines keep on local disk, under
# 3.12 the registry's CUDA build, which runs on the CPU) so that resolving megatron-core never pulls
# another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE=${MCORE:-0.19}
case "$MCORE" in
  0.19) VENV=.venv;           PYTHON=(env PYENV_VERSION=3.12.1 python3.12); MCORE_SPEC=megatron-core==0.19.2 ;;
  0.16) VENV=.venv-mcore016;  PYTHON=(env PYENV_VERSION=3.11.7 python3.11); MCORE_SPEC=megatron-core==0.16.1 ;;
  *) echo "setup_env: MCORE must be 0.19 or 0.16, got '$MCORE'" >&2; exit 2 ;;
esac
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
log=$(mktemp)
pip_install() {
  if ! "$VENV/bin/python" -m pip install "$@" >"$log" 2>&1; then
    cat "$log"; echo "setup_env: pip install $* failed" >&2; exit 1
  fi
}
[ -x "$VENV/bin/python" ] || "${PYTHON[@]}" -m venv "$VENV"
pip_install --upgrade pip
pip_install "$TORCH_SPEC"
pip_install -e ".[test]" "$MCORE_SPEC"
"$VENV/bin/python" -W ignore -c "
import torch, megatron.core
print('setup_env: torch', torch.__version__, '| megatron-core', megatron.core.__version__)" >&2
echo "$VENV/bin/python"
