#!/usr/bin/env python
"""Suggest a TP/PP/CP/SP layout, MST counts and expected per-GPU memory for a model, cluster and
sequence length:

    python scripts/plan_parallel.py --config llama3-8b --nodes 4 --gpus-per-node 8 \\
        --seq-length 131072 --gpu-memory-gib 80

The work (and the memory model's assumptions) is in :mod:`mst_megatron.launch.plan`.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(HERE, ".."))
    from mst_megatron.launch.plan import main

    sys.exit(main(sys.argv[1:], os.path.join(HERE, "..", "examples", "configs")))
