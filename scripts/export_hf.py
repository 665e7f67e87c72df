#!/usr/bin/env python
"""Export an iteration of a checkpoint root (imported with scripts/import_hf.py, then trained) as a
Hugging Face folder that ``transformers`` loads; the config gets the run's context length and RoPE:

    python scripts/export_hf.py --load ckpt --output Llama-3.1-8B-long

See :mod:`mst_megatron.training.hf`.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint root")
    parser.add_argument("--ckpt-step", type=int, default=None, help="iteration to export (default: the latest)")
    parser.add_argument("--output", required=True, help="new or empty folder to write")
    parser.add_argument("--hf-folder", default=None, help="HF config and tokenizer files (default: LOAD/hf)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="tensor dtype (default: the HF config's)")
    args = parser.parse_args(argv)
    import torch

    from mst_megatron.training import run_cli
    from mst_megatron.training.hf import export_hf

    def work():
        out = export_hf(args.load, args.output, args.ckpt_step, args.hf_folder,
                        getattr(torch, args.dtype) if args.dtype else None)
        return f"export_hf: {args.load} -> {out}"

    return run_cli("export_hf.py", work)


if __name__ == "__main__":  # not at import: checkpoint writers re-import this file in helper processes
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
