#!/usr/bin/env python
"""Tokenize text or .jsonl files (or folders of them) into a megatron-core indexed dataset.

Writes OUTPUT_PREFIX.bin (token ids) and OUTPUT_PREFIX.idx (document index) with megatron-core's
``IndexedDatasetBuilder``, the format ``--data-path OUTPUT_PREFIX`` reads (Megatron-LM's too). The
tokenizer flags are the training job's (``--tokenizer-type``: see mst_megatron/training/tokenizer.py);
train with the same ones.

    python scripts/preprocess_data.py --input corpus/ --tokenizer-model data/tokenizer.model \\
        --output-prefix data/corpus --append-eod
    python scripts/preprocess_data.py --input corpus/ --tokenizer-type HuggingFaceTokenizer \\
        --tokenizer-model ckpt/hf --output-prefix data/corpus --append-eod
"""

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mst_megatron.training.corpus import add_input_arguments, documents_from_args, tokenized  # noqa: E402
from mst_megatron.training.tokenizer import add_tokenizer_arguments  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    add_tokenizer_arguments(parser)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with the tokenizer's end-of-document token")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    """Write the dataset and return its prefix."""
    import numpy as np

    from mst_megatron.runtime.quiet import import_megatron_quietly
    from mst_megatron.training import SetupError
    from mst_megatron.training.tokenizer import describe, load_tokenizer

    args = parse_args(argv)
    import_megatron_quietly()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    try:
        tokenizer = load_tokenizer(args)
    except SetupError as e:
        raise SystemExit(f"preprocess_data.py: error: {e}") from None
    eod = tokenizer.eod
    if args.append_eod and (eod is None or eod < 0):
        raise SystemExit(f"preprocess_data.py: error: --append-eod: {describe(args)} has no end-of-document "
                         f"token (its eos token); drop --append-eod or use a tokenizer with one")
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(args.output_prefix + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    num_docs = num_tokens = 0
    for ids in tokenized(tokenizer, documents_from_args(args), args.workers):
        if args.append_eod:
            ids = ids + [eod]
        if not ids:
            continue
        builder.add_document(np.array(ids, dtype=builder.dtype), [len(ids)])
        num_docs += 1
        num_tokens += len(ids)
    if not num_docs:
        raise SystemExit(f"--input {args.input}: no documents found (check --pattern {args.pattern!r})")
    builder.finalize(args.output_prefix + ".idx")
    # megatron-core caches each dataset's sample index under PREFIX/cache, keyed by the run's
    # settings but not by the data: an index built for the previous contents would be reused.
    shutil.rmtree(os.path.join(args.output_prefix, "cache", "GPTDataset_indices"), ignore_errors=True)
    print(f"preprocess_data: {num_docs} documents, {num_tokens} tokens -> {args.output_prefix}.bin/.idx")
    return args.output_prefix


if __name__ == "__main__":
    main()
