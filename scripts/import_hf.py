#!/usr/bin/env python
"""Import a Hugging Face Llama / Mistral / Qwen2 folder (config.json + safetensors) as a checkpoint
root that examples/pretrain_gpt_mst.py trains from at any TP / PP layout:

    python scripts/import_hf.py --hf-folder Llama-3.1-8B --save ckpt
    torchrun ... examples/pretrain_gpt_mst.py --model-config ckpt/model_config.json --load ckpt --save ckpt \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ckpt/hf --make-vocab-size-divisible-by 1 ...

See :mod:`mst_megatron.training.hf`.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-folder", required=True, help="Hugging Face model folder (config.json, *.safetensors)")
    parser.add_argument("--save", required=True, help="new or empty checkpoint root to write")
    args = parser.parse_args(argv)
    from mst_megatron.training import run_cli
    from mst_megatron.training.hf import import_hf

    def work():
        shape = import_hf(args.hf_folder, args.save)
        return f"import_hf: {shape.description} -> {args.save} (--model-config {os.path.join(args.save, 'model_config.json')})"

    return run_cli("import_hf.py", work)


if __name__ == "__main__":  # not at import: checkpoint writers re-import this file in helper processes
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
