#!/usr/bin/env python
"""Tokenize text or .jsonl files (or folders of them) into a megatron-core indexed dataset.

Writes OUTPUT_PREFIX.bin (token ids) and OUTPUT_PREFIX.idx (document index) with megatron-core's
``IndexedDatasetBuilder``, the format ``--data-path OUTPUT_PREFIX`` reads (Megatron-LM's too).

    python scripts/preprocess_data.py --input corpus/ --tokenizer-model data/tokenizer.model \\
        --output-prefix data/corpus --append-eod
"""

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mst_megatron.training.corpus import add_input_arguments, documents_from_args  # noqa: E402

_BATCH_DOCUMENTS = 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--append-eod", action="store_true", help="end every document with </s>")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer threads")
    return parser.parse_args(argv)


def _batches(docs, size):
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv=None) -> str:
    """Write the dataset and return its prefix."""
    import numpy as np
    import sentencepiece as spm

    from mst_megatron.runtime.quiet import import_megatron_quietly

    args = parse_args(argv)
    if not os.path.isfile(args.tokenizer_model):
        raise SystemExit(f"--tokenizer-model {args.tokenizer_model}: no such file")
    import_megatron_quietly()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_model)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(args.output_prefix + ".bin", dtype=DType.optimal_dtype(sp.get_piece_size()))
    num_docs = num_tokens = 0
    for batch in _batches(documents_from_args(args), _BATCH_DOCUMENTS):
        for ids in sp.encode(batch, num_threads=args.workers):
            if args.append_eod:
                ids.append(sp.eos_id())
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
