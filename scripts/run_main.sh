#!/usr/bin/env bash
# The main job from a fresh machine, in one command: set up the environment, build a corpus from
# text this machine already has (the Python standard library's own sources), train a sentencepiece
# tokenizer, preprocess into a megatron-core indexed dataset, and pretrain the tiny model with MST
# under torchrun (2 gloo ranks, TP=2 on CPU; NCCL and one rank per GPU, up to 2, on a GPU machine)
# until the validation loss has clearly fallen; the checkpoint lands in $WORK/checkpoints.
#
#   bash scripts/run_main.sh                      # everything, defaults
#   bash scripts/run_main.sh --train-iters 50     # extra flags go to examples/pretrain_gpt_mst.py
#   MST_WORK=/tmp/run bash scripts/run_main.sh    # another work folder (default: runs/main)
#   MCORE=0.16 bash scripts/run_main.sh           # on megatron-core 0.16.1 (default: 0.19.2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh | tail -n 1)
WORK=${MST_WORK:-runs/main}
mkdir -p "$WORK"

STDLIB=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
CORPUS=(--input "$STDLIB" --pattern '*.py' --exclude-dir site-packages --exclude-dir dist-packages
        --exclude-dir test --exclude-dir tests --exclude-dir idlelib)
$PY scripts/train_tokenizer.py "${CORPUS[@]}" --max-bytes 3000000 --vocab-size 4096 \
    --model-prefix "$WORK/tokenizer"
$PY scripts/preprocess_data.py "${CORPUS[@]}" --max-bytes 6000000 --append-eod \
    --tokenizer-model "$WORK/tokenizer.model" --output-prefix "$WORK/data/stdlib"

# One rank per GPU (at most 2) on a GPU machine; 2 CPU ranks otherwise. TensorBoard logs where it
# is installed; the loss plot (loss.png) is always written next to the checkpoints.
NPROC=$($PY -c 'import torch; n = torch.cuda.device_count(); print(min(n, 2) if n else 2)')
TENSORBOARD=()
$PY -c 'import torch.utils.tensorboard' 2>/dev/null && TENSORBOARD=(--tensorboard-dir "$WORK/tensorboard")
exec "$(dirname "$PY")/torchrun" --standalone --nproc-per-node "$NPROC" examples/pretrain_gpt_mst.py \
    --model-config tiny --tensor-model-parallel-size "$NPROC" \
    --data-path "$WORK/data/stdlib" --tokenizer-model "$WORK/tokenizer.model" --split 98,2,0 \
    --seq-length 256 --micro-batch-size 4 --global-batch-size 8 \
    --train-iters 250 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --lr-decay-style cosine \
    --eval-interval 25 --eval-iters 8 --exit-duration-in-mins 6 \
    --save "$WORK/checkpoints" --save-interval 125 "${TENSORBOARD[@]}" "$@"
