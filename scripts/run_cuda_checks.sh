#!/usr/bin/env bash
# The GPU checks, in one call on a CUDA machine: the CUDA tests (tests/cuda/test_cuda.py) and the GPU
# benchmark (benchmarks/bench_cuda.py), writing logs and result rows under $OUT (default ./cuda-results);
# `python -m benchmarks.tables --merge cuda-results/rows.jsonl` adds the rows to benchmarks/results/.
# Needs megatron-core importable (0.19.2, or 0.16.1); on the lent device machine it comes as a carried
# wheel in .whl/ (pip download --no-deps --only-binary=:all: --python-version 3.12 ... megatron-core==0.19.2):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-cuda-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
"$PY" -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" \
  | tee -a "$OUT/gpu.csv"
"$PY" -m pytest -q -ra -p no:cacheprovider tests/cuda/test_cuda.py --junitxml="$OUT/test_cuda.xml" 2>&1 \
  | grep -v "Unknown MLP type" | tee "$OUT/test_cuda.log"
tests_rc=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # BENCH_ARGS: extra flags, e.g. "--parts lm_head model"
"$PY" -m benchmarks.bench_cuda --rows "$OUT/rows.jsonl" --time-budget "${BENCH_BUDGET_S:-330}" ${BENCH_ARGS:-} 2>&1 \
  | grep -v "Unknown MLP type" | tee "$OUT/bench_cuda.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
