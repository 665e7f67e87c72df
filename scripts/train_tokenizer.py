#!/usr/bin/env python
"""Train a sentencepiece tokenizer on text or .jsonl files (or folders of them).

The model keeps text exactly (identity normalisation, whitespace kept: code and prose round-trip)
and falls back to bytes, so no id is ever <unk>. Ids: 0 <unk>, 1 <s>, 2 </s> (end of document).

    python scripts/train_tokenizer.py --input corpus/ --model-prefix data/tokenizer --vocab-size 4096
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mst_megatron.training.corpus import add_input_arguments, documents_from_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--max-document-bytes", type=int, default=1 << 20,
                        help="longer documents are skipped by sentencepiece (default: 1 MiB)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return parser.parse_args(argv)


def main(argv=None) -> str:
    """Train and return the path of the ``.model`` file."""
    import sentencepiece as spm

    args = parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    docs = list(documents_from_args(args))
    if not docs:
        raise SystemExit(f"--input {args.input}: no documents found (check --pattern {args.pattern!r})")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9995,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked for
        max_sentence_length=args.max_document_bytes,
        num_threads=args.threads,
        minloglevel=2,
    )
    model = args.model_prefix + ".model"
    size = spm.SentencePieceProcessor(model_file=model).get_piece_size()
    print(f"train_tokenizer: {len(docs)} documents -> {model} ({size} tokens)")
    return model


if __name__ == "__main__":
    main()
