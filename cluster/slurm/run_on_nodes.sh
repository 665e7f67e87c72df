#!/bin/bash
# Body of the SLURM batch files in this folder, run on the job's first node: build the torchrun command
# here first (so a missing variable or a layout that does not fit the allocation stops the job before any
# node starts), print it, then start one launcher per node with srun. With --dry-run (or MST_DRY_RUN=1)
# it only prints; that also works outside SLURM with the SLURM_* variables set by hand.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DRY_RUN="${MST_DRY_RUN:-0}"
for arg in "$@"; do if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; fi; done  # wherever it stands

JOB=(bash "$ROOT/cluster/train_llama3_8b_long.sh" --scheduler slurm)
SRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${JOB[@]}")
TORCHRUN="$("${JOB[@]}" --dry-run)"  # on bad input the launcher's message is printed and the job stops here
printf -v SRUN_TEXT '%q ' "${SRUN[@]}"
echo "layout: SEQ_LENGTH=$SEQ_LENGTH TP=$TP PP=$PP CP=$CP on $SLURM_JOB_NUM_NODES node(s)"
echo "srun command: ${SRUN_TEXT% }"
echo "torchrun command on every node: $TORCHRUN"
[[ "$DRY_RUN" == 1 ]] && exit 0
command -v srun > /dev/null || { echo "run_on_nodes.sh: error: srun not found: submit the batch file with sbatch" >&2; exit 2; }
exec "${SRUN[@]}"
