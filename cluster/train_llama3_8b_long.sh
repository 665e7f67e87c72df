#!/bin/bash
# Llama-3-8B long-context pretraining with MST on, one launcher per node: the job that the SLURM batch
# files (cluster/slurm/) and the Kubernetes manifest (cluster/k8s/) start on every node.
#
# Environment:
#   required  SEQ_LENGTH TP PP CP         layout (see scripts/plan_parallel.py)
#             DATA_PATH                   dataset prefixes, optionally weighted: "0.7 /data/a 0.3 /data/b"
#             TOKENIZER_MODEL             sentencepiece .model file
#   optional  SAVE_DIR (checkpoints/mst-llama3-8b-$SEQ_LENGTH), GLOBAL_BATCH_SIZE (16), TRAIN_ITERS (1000),
#             MLP_MINI_SEQUENCES, LM_HEAD_MINI_SEQUENCES (auto), EXTRA_ARGS (more pretrain_gpt_mst.py flags),
#             CP_COMM_TYPE (a2a while TP x CP <= 32, Llama-3-8B's attention heads; the ring, p2p, past them)
# Arguments: launcher flags (bash cluster/torchrun_multinode.sh --help), e.g. --dry-run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "train_llama3_8b_long.sh: error: $*" >&2; exit 2; }

for var in SEQ_LENGTH TP PP CP DATA_PATH TOKENIZER_MODEL; do
    [[ -n "${!var:-}" ]] || die "$var is not set (required: SEQ_LENGTH TP PP CP DATA_PATH TOKENIZER_MODEL)"
done
read -ra DATA <<< "$DATA_PATH"
read -ra EXTRA <<< "${EXTRA_ARGS:-}"
SAVE_DIR="${SAVE_DIR:-checkpoints/mst-llama3-8b-$SEQ_LENGTH}"
HEADS=32  # the all-to-all splits the heads over TP x CP ranks; the ring needs no split
CP_COMM_TYPE="${CP_COMM_TYPE:-$([[ $((TP * CP)) -le $HEADS ]] && echo a2a || echo p2p)}"

ARGS=(--model-config llama3-8b --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
      --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
      --cp-comm-type "$CP_COMM_TYPE"
      --mlp-mini-sequences "${MLP_MINI_SEQUENCES:-auto}" --lm-head-mini-sequences "${LM_HEAD_MINI_SEQUENCES:-auto}"
      --micro-batch-size 1 --global-batch-size "${GLOBAL_BATCH_SIZE:-16}" --bf16 --use-distributed-optimizer
      --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
      --train-iters "${TRAIN_ITERS:-1000}" --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 50
      --data-path "${DATA[@]}" --tokenizer-model "$TOKENIZER_MODEL"
      --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 100 --eval-interval 100 --eval-iters 4)
[[ "$TP" != 1 ]] && ARGS+=(--sequence-parallel)
exec bash "$ROOT/cluster/torchrun_multinode.sh" "$@" "$ROOT/examples/pretrain_gpt_mst.py" "${ARGS[@]}" "${EXTRA[@]}"
