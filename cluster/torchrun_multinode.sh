#!/bin/bash
# Start one node of a multi-node MST job with torchrun; run it once on every node:
#
#   bash cluster/torchrun_multinode.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint host0:29500 \
#       examples/pretrain_gpt_mst.py --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 ...
#
# Under SLURM or a Kubernetes PyTorchJob the node count, GPUs per node and rendezvous host come from
# the scheduler's variables. --dry-run (or MST_DRY_RUN=1) prints the torchrun command only.
# The logic (and the variables it reads) is in mst_megatron/launch/torchrun.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m mst_megatron.launch.torchrun "$@"
