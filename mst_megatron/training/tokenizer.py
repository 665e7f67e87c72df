"""The tokenizer of the training job and of ``scripts/preprocess_data.py``: Megatron-LM's
``--tokenizer-type`` names, built by megatron-core's tokenizer libraries
(``megatron.core.tokenizers.MegatronTokenizer``), the same way on megatron-core 0.16.1 and 0.19.2.

- ``SentencePieceTokenizer`` (the default): ``--tokenizer-model`` is a sentencepiece ``.model`` file.
- ``HuggingFaceTokenizer``: ``--tokenizer-model`` is a local Hugging Face tokenizer folder
  (``tokenizer.json`` and ``tokenizer_config.json``, as ``save_pretrained`` and ``scripts/import_hf.py``'s
  ``ROOT/hf`` hold it), loaded with ``AutoTokenizer`` (fast tokenizer; the tokenizer's own special
  tokens, e.g. a BOS, are kept, as Megatron-LM's preprocessing keeps them).
- ``TikTokenizer``: ``--tokenizer-model`` is a tiktoken vocabulary ``.json`` file (a list of
  ``{"rank", "token_bytes", "token_str"}``, ranks 0..255 the single bytes). Ids are
  ``--tiktoken-num-special-tokens`` special tokens (``<unk> <s> </s> ...``, ``</s>`` ends a document)
  followed by the file's first ``--vocab-size`` minus that many ranks; ``--tiktoken-pattern`` picks
  the pre-tokenizer regex.

The returned object is megatron-core's tokenizer: ``tokenize(text) -> ids``, ``vocab_size`` (every id
is below it) and ``eod`` (the end-of-document id ``--append-eod`` writes; None or < 0 when it has none).
"""

import argparse
import importlib.util
import json
import os

from mst_megatron.training import SetupError

# --tokenizer-type -> (megatron-core's library, the package it needs, what --tokenizer-model names)
_KINDS = {
    "SentencePieceTokenizer": ("sentencepiece", "sentencepiece", "a sentencepiece .model file"),
    "HuggingFaceTokenizer": ("huggingface", "transformers", "a Hugging Face tokenizer folder (tokenizer.json)"),
    "TikTokenizer": ("tiktoken", "tiktoken", "a tiktoken vocabulary .json file"),
}
TOKENIZER_TYPES = tuple(_KINDS)
# megatron-core's TikTokenizer defaults (Megatron-LM's too): its vocabulary and its reserved ids.
TIKTOKEN_VOCAB_SIZE = 2**17
TIKTOKEN_NUM_SPECIAL_TOKENS = 1000
_TIKTOKEN_NAMED_SPECIALS = 7  # <unk> <s> </s> <mask> <pad> <cls> <sep>: megatron-core's required ones


def add_tokenizer_arguments(group) -> None:
    """``--tokenizer-type``, ``--tokenizer-model`` and TikTokenizer's flags, on an argparse group or
    parser (the training job's and ``scripts/preprocess_data.py``'s, so both read the same tokenizer)."""
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="SentencePieceTokenizer",
                       help="Megatron-LM's tokenizer kind (see mst_megatron/training/tokenizer.py)")
    group.add_argument("--tokenizer-model", default=None,
                       help="sentencepiece .model file, Hugging Face tokenizer folder, or tiktoken vocabulary .json")
    group.add_argument("--vocab-size", type=int, default=None,
                       help=f"TikTokenizer: its vocabulary, special tokens included (default {TIKTOKEN_VOCAB_SIZE})")
    group.add_argument("--tiktoken-pattern", choices=("v1", "v2"), default="v2",
                       help="TikTokenizer: megatron-core's pre-tokenizer regex")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=TIKTOKEN_NUM_SPECIAL_TOKENS,
                       help="TikTokenizer: ids reserved for special tokens before the vocabulary file's")


def describe(args: argparse.Namespace) -> str:
    """``TYPE PATH``: how error messages name the tokenizer."""
    return f"{args.tokenizer_type} {args.tokenizer_model}"


def _check_flags(args: argparse.Namespace) -> None:
    kind, path = args.tokenizer_type, args.tokenizer_model
    what = _KINDS[kind][2]
    if path is None:
        raise SetupError(f"--tokenizer-model is required: {what} for --tokenizer-type {kind}")
    if kind != "TikTokenizer" and args.vocab_size is not None:
        raise SetupError(f"--vocab-size applies to --tokenizer-type TikTokenizer only; a {kind}'s vocabulary "
                         f"is its file's: drop --vocab-size")
    found = os.path.isdir(path) if kind == "HuggingFaceTokenizer" else os.path.isfile(path)
    if not found:
        raise SetupError(f"--tokenizer-model {path}: no such {'folder' if kind == 'HuggingFaceTokenizer' else 'file'} "
                         f"({what} for --tokenizer-type {kind})")
    if kind == "TikTokenizer":
        if not path.endswith(".json"):
            raise SetupError(f"--tokenizer-model {path}: --tokenizer-type TikTokenizer takes {what}")
        special, vocab = args.tiktoken_num_special_tokens, _tiktoken_vocab_size(args)
        if not _TIKTOKEN_NAMED_SPECIALS <= special < vocab:
            raise SetupError(f"--tiktoken-num-special-tokens {special} must be >= {_TIKTOKEN_NAMED_SPECIALS} "
                             f"(megatron-core's named special tokens) and < --vocab-size ({vocab})")


def _tiktoken_vocab_size(args: argparse.Namespace) -> int:
    return TIKTOKEN_VOCAB_SIZE if args.vocab_size is None else args.vocab_size


def _kwargs(args: argparse.Namespace) -> dict:
    """megatron-core's constructor arguments, explicit where its defaults differ between versions
    (0.16.1's Hugging Face wrapper defaults to a slow tokenizer without its special tokens)."""
    if args.tokenizer_type == "HuggingFaceTokenizer":
        return dict(use_fast=True, include_special_tokens=True)
    if args.tokenizer_type == "TikTokenizer":
        return dict(pattern=args.tiktoken_pattern, vocab_size=_tiktoken_vocab_size(args),
                    num_special_tokens=args.tiktoken_num_special_tokens)
    return {}


def _tiktoken_hint(args: argparse.Namespace) -> str:
    """Why megatron-core's TikTokenizer refused the file, where it is the common case: too few ranks."""
    try:
        with open(args.tokenizer_model) as f:
            ranks = len(json.load(f))
    except (OSError, ValueError, TypeError):
        return ""
    needed = _tiktoken_vocab_size(args) - args.tiktoken_num_special_tokens
    if ranks >= needed:
        return ""
    return (f"; it holds {ranks} ranks, but --vocab-size {_tiktoken_vocab_size(args)} minus "
            f"--tiktoken-num-special-tokens {args.tiktoken_num_special_tokens} needs {needed}: pass --vocab-size "
            f"{ranks + args.tiktoken_num_special_tokens} or less")


def load_tokenizer(args: argparse.Namespace):
    """megatron-core's GPT tokenizer for ``args.tokenizer_type`` / ``args.tokenizer_model`` (and the
    TikTokenizer flags of :func:`add_tokenizer_arguments`). Bad flags or a file that does not load:
    one-line :class:`~mst_megatron.training.SetupError`."""
    _check_flags(args)
    kind = args.tokenizer_type
    library, package, what = _KINDS[kind]
    if importlib.util.find_spec(package) is None:  # megatron-core would fail later, on a NameError
        raise SetupError(f"--tokenizer-type {kind} needs the {package} package: pip install {package}")
    from megatron.core.tokenizers import MegatronTokenizer

    try:
        return MegatronTokenizer.from_pretrained(
            args.tokenizer_model, metadata_path={"library": library, "model_type": "gpt"}, **_kwargs(args)
        )
    except (RuntimeError, OSError, ValueError, AssertionError, KeyError, TypeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = _tiktoken_hint(args) if kind == "TikTokenizer" else ""
        raise SetupError(f"--tokenizer-model {args.tokenizer_model}: not {what} that megatron-core's {kind} "
                         f"loads ({detail}){hint}") from None
