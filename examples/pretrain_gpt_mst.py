#!/usr/bin/env python
"""Pretrain a GPT with Mini-Sequence Transformers on megatron-core. Launch with torchrun:

    torchrun --nproc-per-node 2 examples/pretrain_gpt_mst.py --tensor-model-parallel-size 2 \\
        --data-path data/corpus --tokenizer-model data/tokenizer.model --save ckpt --load ckpt

Flags follow Megatron-LM's names (``--help`` lists them); ``--model-config`` takes a name from
examples/configs/ (tiny, llama3-8b, llama3-70b, llama2-7b, mistral-7b, qwen2-7b) or a JSON path.
The work is done by :mod:`mst_megatron.training.pretrain`.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":  # not at import: checkpoint writers re-import this file in helper processes
    sys.path.insert(0, os.path.join(HERE, ".."))
    from mst_megatron.training.pretrain import main

    sys.exit(main(sys.argv[1:], os.path.join(HERE, "configs")))
